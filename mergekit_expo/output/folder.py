"""What may be written where, known before anything is read.

Two rules hold on every surface that writes (the merge, ``search --write-best``, ``lora``):

- **Inputs are never written.** The output folder may not be an input's folder, lie inside one or
  contain one, and may not hold a file that *is* an input file (a symbolic or hard link to it):
  moving the earlier artefact aside would remove the user's only copy of a model.
- **One kind of artefact per folder.** A folder holds a model or an adapter. Writing one kind over
  the other, or into a folder holding files a loader reads that the new output would not replace
  (``adapter_config.json`` beside a model, remote code, another tokenizer), is refused with the
  files named: transformers and PEFT decide what a folder is by those files.
A re-run of the same kind replaces the earlier artefact's files (``replaced``), atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from mergekit_expo.errors import ExpoError

Kind = Literal["model", "adapter"]


class OutputFolderError(ExpoError, NotADirectoryError):
    """The output folder may not be written (see the message)."""

# Files of a model folder: replaced as a whole by the next merge into it.
MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "README.md",
        "mergekit_config.yml",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "merges.txt",
        "vocab.json",
        "vocab.txt",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
    }
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
# Files of an adapter folder (what PEFT's save_pretrained and mergekit-expo lora write).
ADAPTER_FILES = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
     "mergekit_expo.json"}
)
# What a loader reads besides the files above: configs, remote code, tokenizer and
# processor files. A file like this that the new output would not replace makes a mixed folder.
LOADER_SUFFIXES = (".json", ".py", ".model", ".tiktoken", ".jinja", ".yml", ".yaml", ".txt")
NOT_LOADED = frozenset({"LICENSE.txt", "requirements.txt", "notes.txt"})


def replaced(name: str, kind: Kind) -> bool:
    """Whether writing a ``kind`` into a folder replaces its file ``name`` (moves it aside)."""
    if kind == "adapter":
        return name in ADAPTER_FILES
    return name in MODEL_FILES or name.endswith(WEIGHT_SUFFIXES)


def loader_reads(name: str) -> bool:
    """Whether transformers or PEFT may read ``name`` when loading the folder."""
    return (
        name in MODEL_FILES or name in ADAPTER_FILES or name.endswith(WEIGHT_SUFFIXES)
        or (name.endswith(LOADER_SUFFIXES) and name not in NOT_LOADED)
    )


def kind_of(folder: Path) -> Kind | None:
    """The artefact a folder holds: an adapter (adapter_config.json), a model (config.json or
    weights), or None."""
    if not folder.is_dir():
        return None
    names = set(os.listdir(folder))
    if names & {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}:
        return "adapter"
    if "config.json" in names or any(n.endswith(WEIGHT_SUFFIXES) for n in names):
        return "model"
    return None


def path_problem(out: str | os.PathLike) -> str | None:
    """A file in the output folder's place."""
    path = Path(os.path.realpath(out))
    if path.exists() and not path.is_dir():
        return f"output path {path} exists and is not a folder"
    return None


def kind_problem(out: str | os.PathLike, kind: Kind) -> str | None:
    """Why a ``kind`` may not be written into ``out``: another kind there, or files a loader reads
    that the new output would leave beside it."""
    folder = Path(os.path.realpath(out))
    if not folder.is_dir():
        return None
    found = kind_of(folder)
    names = sorted(os.listdir(folder))
    other = "an adapter" if found == "adapter" else "a model"
    mine = "an adapter" if kind == "adapter" else "a model"
    if found is not None and found != kind:
        theirs = [n for n in names if replaced(n, found) or loader_reads(n)]
        return (
            f"output folder {folder} holds {other} ({', '.join(theirs[:6])}"
            f"{', …' if len(theirs) > 6 else ''}); writing {mine} "
            "there would make a folder that loads as neither: choose an empty or new folder, or "
            "move those files away"
        )
    stray = [n for n in names if loader_reads(n) and not replaced(n, kind)]
    if stray:
        return (
            f"output folder {folder} holds {', '.join(stray)}, which loaders read and the new "
            f"{kind} would not replace (it would load beside it): choose an empty or new folder, "
            "or move those files away"
        )
    return None


def input_problem(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike]) -> str | None:
    """Why ``out`` would write over an input: ``inputs`` maps a label (``θ_T``, ``--base``) to a
    local folder or file. Resolved paths, so symbolic links count, and files by inode, so hard
    links count."""
    target = Path(os.path.realpath(out))
    for label, given in inputs.items():
        source = Path(os.path.realpath(given))
        if not source.exists():
            continue
        folder = source if source.is_dir() else source.parent
        if target == folder or folder in target.parents:
            where = "is" if target == folder else "lies inside"
            return (
                f"output folder {out} {where} the folder of {label} ({given}): inputs are never "
                "written; choose another output folder"
            )
        if target in folder.parents:
            return (
                f"output folder {out} contains {label} ({given}): inputs are never written; "
                "choose an output folder that holds no input"
            )
    shared = _shared_files(target, inputs)
    if shared:
        name, label = shared
        return (
            f"output folder {out} holds {name}, which is a link to a file of {label}: writing "
            "there would replace an input; choose another output folder"
        )
    return None


def _shared_files(target: Path, inputs: Mapping[str, str | os.PathLike]) -> tuple[str, str] | None:
    """A file in ``target`` that is (by device and inode) a file of an input."""
    if not target.is_dir():
        return None
    mine = {}
    for path in _files(target):
        try:
            stat = path.stat()  # follows symbolic links
        except OSError:
            continue
        mine[(stat.st_dev, stat.st_ino)] = path.name
    for label, given in inputs.items():
        source = Path(os.path.realpath(given))
        for path in _files(source if source.is_dir() else source.parent):
            try:
                stat = path.stat()
            except OSError:
                continue
            if (stat.st_dev, stat.st_ino) in mine:
                return mine[(stat.st_dev, stat.st_ino)], label
    return None


def _files(folder: Path) -> Iterable[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_file()]
    except OSError:
        return []


def write_problems(out: str | os.PathLike, kind: Kind,
                   inputs: Mapping[str, str | os.PathLike]) -> list[str]:
    """Everything that forbids writing a ``kind`` into ``out``, checked before anything is read."""
    problems = [path_problem(out)]
    if problems[0] is None:
        problems += [input_problem(out, inputs), kind_problem(out, kind)]
    return [p for p in problems if p]
