"""The output folder holds the complete new model or no new file: stage, verify, move into place.

mergekit writes into the output folder in place: an interrupted merge leaves complete-looking
weights beside a truncated ``config.json``, and a re-run with another shard layout leaves the old
``model.safetensors`` or index beside the new files. For expo merges, the ``run_merge`` patch
runs mergekit's ``run_merge`` into a staging folder instead,

    PARENT/.OUT.expo-staging-PID-XXXXXX/OUT/

on the same filesystem (same name, so mergekit's model card names the model as before), then
checks it (every JSON parses, every safetensors file is as long as its header says, the index
names only shards that are there, tokenizer files are not empty, the tokenizer copy did not hit
a disk error) and moves it into place file by file:

1. the model files of the earlier merge in OUT (``config.json`` first, so that it stops loading
   at once) go aside into ``PARENT/.OUT.expo-old-PID-XXXXXX/``;
2. the new files move in, ``config.json`` last;
3. the set-aside files are deleted.

A file in OUT that no model has (``.git``, notes) stays. SIGINT and SIGTERM are held during
these renames (milliseconds) and delivered after them. Any failure before step 1 deletes the
staging folder and leaves OUT untouched; SIGKILL leaves the staging folder, which the next expo
merge into the same OUT deletes (when the process that made it is gone).

Nothing is fsynced, as mergekit fsyncs nothing: these guarantees are about the process failing,
and what it wrote stays in the kernel's page cache when it dies. Flushing the staged model
before the move would also cover an OS crash or a power cut, but would make every merge wait
for its whole output to reach the disk.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import secrets
import shutil
import signal
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

LOG = logging.getLogger("mergekit_expo")

STAGING = ".expo-staging-"
ASIDE = ".expo-old-"
# Files that belong to a model folder: replaced as a whole by the next merge into it.
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
# Tokenizer files mergekit copies or writes; an empty one is a failed copy.
TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
     "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja"}
)
# A tokenizer copy that failed with one of these did not run out of luck but out of disk.
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS})


class IncompleteOutputError(RuntimeError):
    """The staged model is not complete; nothing was moved into the output folder."""


class Terminated(BaseException):
    """SIGTERM arrived during a staged merge: unwind, delete the staging folder, then exit."""

    def __init__(self, signum: int):
        super().__init__(f"received signal {signum}")
        self.signum = signum


def is_model_file(name: str) -> bool:
    return name in MODEL_FILES or name.endswith(WEIGHT_SUFFIXES)


def destination(path: str) -> str:
    """The output folder a staged merge moves into (``PARENT/OUT`` for
    ``PARENT/.OUT.expo-staging-…/OUT``); any other path as it is. Messages name this one."""
    staged_in = Path(path).parent
    if staged_in.name.startswith(f".{Path(path).name}{STAGING}"):
        return str(staged_in.parent / Path(path).name)
    return path


@contextlib.contextmanager
def staged(out_path: str) -> Iterator[str]:
    """Yield the staging folder to merge into; on success move the model into ``out_path``."""
    from mergekit_expo.check.forecast import output_path_problem

    out = Path(os.path.realpath(out_path))
    problem = output_path_problem(out)
    if problem:
        raise NotADirectoryError(problem)
    remove_leftovers(out)
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    root = out.parent / f".{out.name}{STAGING}{tag}"
    root.mkdir(parents=True)
    stage = root / out.name
    watcher = _TokenizerCopyWatcher()
    try:
        with _sigterm_raises(), watcher:
            yield str(stage)
            watcher.raise_disk_error()
            verify(stage)
            with _signals_held():
                commit(stage, out, out.parent / f".{out.name}{ASIDE}{tag}")
    except Terminated as terminated:
        shutil.rmtree(root, ignore_errors=True)
        LOG.error("interrupted by signal %d: %s left as it was", terminated.signum, out)
        signal.signal(terminated.signum, signal.SIG_DFL)
        os.kill(os.getpid(), terminated.signum)  # die of it, as without us
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


def remove_leftovers(out: Path) -> None:
    """Delete staging and set-aside folders of earlier merges into ``out`` whose process is gone."""
    if not out.parent.is_dir():
        return
    for marker in (STAGING, ASIDE):
        for path in out.parent.glob(f".{glob.escape(out.name)}{marker}*"):
            pid = path.name[len(out.name) + 1 + len(marker):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                LOG.info("removing %s, left by an interrupted merge", path)
                shutil.rmtree(path, ignore_errors=True)


def commit(stage: Path, out: Path, aside: Path) -> None:
    """Move the earlier model in ``out`` aside, the staged one in, then delete the earlier one.

    An error on the way moves back what was moved, so that ``out`` is as it was.
    """
    new = sorted(os.listdir(stage), key=lambda name: name == "config.json")  # config.json last
    moved: list[tuple[Path, Path]] = []
    try:
        if out.is_dir():
            old = [name for name in os.listdir(out) if is_model_file(name) or name in new]
            old.sort(key=lambda name: name != "config.json")  # config.json first
            if old:
                aside.mkdir()
            for name in old:
                os.rename(out / name, aside / name)
                moved.append((out / name, aside / name))
        else:
            out.mkdir()
        for name in new:
            os.rename(stage / name, out / name)
            moved.append((stage / name, out / name))
    except BaseException:
        for source, target in reversed(moved):
            with contextlib.suppress(OSError):
                os.rename(target, source)
        with contextlib.suppress(OSError):
            aside.rmdir()  # only if everything went back
        raise
    shutil.rmtree(aside, ignore_errors=True)


def verify(folder: Path) -> None:
    """Refuse a staged model that a loader would read wrongly or not at all."""
    names = set(os.listdir(folder)) if folder.is_dir() else set()
    if "config.json" not in names:
        raise IncompleteOutputError(
            f"the merge wrote no config.json into {folder} (mergekit moved or removed its output)"
        )
    for name in sorted(names):
        path = folder / name
        if name.endswith(".json"):
            try:
                content = json.loads(path.read_bytes())
            except ValueError as error:
                raise IncompleteOutputError(f"{name} is not valid JSON: {error}") from None
            if name.endswith(".index.json"):
                for shard in sorted(set(content.get("weight_map", {}).values())):
                    if shard not in names:
                        raise IncompleteOutputError(f"{name} names {shard}, which is missing")
        elif name.endswith(".safetensors"):
            _check_safetensors(path)
        if name in TOKENIZER_FILES and path.stat().st_size == 0:
            raise IncompleteOutputError(f"tokenizer file {name} is empty")


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if header_size < 0 or 8 + header_size > size:
            raise IncompleteOutputError(f"{path.name} is truncated (no complete header)")
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            raise IncompleteOutputError(f"{path.name} has a corrupt header") from None
    end = max(
        (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
        default=0,
    )
    if 8 + header_size + end != size:
        raise IncompleteOutputError(
            f"{path.name} is {size} bytes, its header says {8 + header_size + end}"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception (only where nobody else handles it), so cleanup runs."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is raise_terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while files move, then act on them as before."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, frame: received.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in received:
            os.kill(os.getpid(), signum)


class _TokenizerCopyWatcher(logging.Handler):
    """mergekit logs a failed tokenizer copy and goes on; a disk error there fails the merge."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.error: OSError | None = None

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, OSError) and error.errno in DISK_ERRORS and self.error is None:
            self.error = error

    def __enter__(self):
        logging.getLogger("mergekit.merge").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("mergekit.merge").removeHandler(self)

    def raise_disk_error(self) -> None:
        if self.error is not None:
            raise IncompleteOutputError(
                f"copying the tokenizer failed: {self.error}; the output would lack it"
            ) from self.error
