"""Mistakes in an ``expo`` config, found before any tensor is read.

mergekit passes every key under ``parameters:`` through without a word, so ``alhpa: 0.5``,
``lamda: 0.3``, ``alpha`` under one model's ``parameters:`` (shared parameters are read only
from the global, module and slice scopes) or a filter that matches no tensor all leave the
default α = 0.3 in force. The checks here refuse them, naming the key, where it is and what to
write instead. ``hooks`` runs them at the start of every expo merge (``config_findings`` and
``input_findings`` before mergekit reads the inputs, ``plan_findings`` once the merge is planned);
``mergekit-expo check`` runs them too and adds the checks that read weights or the tokenizer.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from mergekit_expo.merge import METHOD_NAME
from mergekit_expo.merge.headers import CheckpointError, TensorHeader, read_checkpoint

LOG = logging.getLogger("mergekit_expo")

SHARED = ("alpha", "lambda", "warn_relative_change")  # one value per tensor, for all models
PER_MODEL = ("final",)
KNOWN = SHARED + PER_MODEL
FILTER_EXAMPLE = "alpha: [{filter: mlp, value: 0.5}, {value: 0.3}]"


class ExpoConfigError(ValueError):
    """The config would not merge what its author wrote; nothing was read or written."""


@dataclass(frozen=True)
class Finding:
    level: str  # "error" (refused), "warning" (merged, but probably not what was meant), "info"
    message: str


def uses_expo(config: Any) -> bool:
    return getattr(config, "merge_method", None) == METHOD_NAME


def raise_errors(findings: Iterable[Finding], *, context: str = "") -> None:
    """Log warnings and notes; raise one error listing every refusal."""
    errors = []
    for finding in findings:
        if finding.level == "error":
            errors.append(finding.message)
        elif finding.level == "warning":
            LOG.warning("%s", finding.message)
        else:
            LOG.info("%s", finding.message)
    if errors:
        head = f"{context}: " if context else ""
        raise ExpoConfigError(head + "\n".join(errors))


# -- parameters --------------------------------------------------------------------------------


def parameter_scopes(config: Any) -> Iterator[tuple[str, dict | None, Any, Any]]:
    """(where, parameters, model or None for shared scopes, base model) for every scope."""
    base = config.base_model
    yield "parameters", config.parameters, None, base
    yield from _models_and_slices("", config, base)
    for name, module in (config.modules or {}).items():
        yield f"modules.{name}.parameters", module.parameters, None, base
        yield from _models_and_slices(f"modules.{name}.", module, base)


def _models_and_slices(prefix: str, owner: Any, base: Any):
    for index, model in enumerate(owner.models or []):
        yield f"{prefix}models[{index}].parameters", model.parameters, model.model, base
    for index, piece in enumerate(owner.slices or []):
        where = f"{prefix}slices[{index}]"
        slice_base = piece.base_model or base
        yield f"{where}.parameters", piece.parameters, None, slice_base
        for number, source in enumerate(piece.sources):
            yield (
                f"{where}.sources[{number}].parameters", source.parameters, source.model,
                slice_base,
            )


def config_findings(config: Any) -> list[Finding]:
    """Unknown keys, shared parameters given per model, ``final`` misplaced, negative α."""
    findings = []
    for where, parameters, model, base in parameter_scopes(config):
        for key in parameters or {}:
            message = _key_problem(str(key), where, model, base)
            if message:
                findings.append(Finding("error", message))
    negative = sorted(
        {value for where, key, value in _numbers(config) if key == "alpha" and value < 0}
    )
    if negative:
        findings.append(
            Finding(
                "info",
                f"expo: alpha = {', '.join(f'{v:g}' for v in negative)} is negative: the merge "
                "interpolates back toward θ₀ (between θ₀ and θ_T) instead of extrapolating "
                "beyond θ_T.",
            )
        )
    return findings


def _key_problem(key: str, where: str, model: Any, base: Any) -> str | None:
    if model is None:
        if key in SHARED:
            return None
        if key == "final":
            return (
                f"expo: `final` in {where} would mark every model as θ_T: put `final: true` "
                "under the parameters of the one model that is θ_T (e.g. "
                "models[1].parameters), or leave it out to use the last model listed."
            )
        return _unknown(key, where, SHARED)
    if key == "final":
        if model == base:
            return (
                f"expo: `final` in {where} is set on the base model {model}, which is θ₀ (the "
                "reference); mark the aligned model θ_T instead."
            )
        return None
    if key in SHARED:
        owner = f"the base model {model}" if model == base else f"model {model}"
        return (
            f"expo: `{key}` in {where} (under {owner}) is ignored by mergekit: `{key}` is one "
            f"value per tensor, shared by all models, so the default would be used. Write it "
            f"under the top-level `parameters:` (e.g. `{key}: 0.5`), or for some tensors only "
            f"with a filter, e.g. `{FILTER_EXAMPLE.replace('alpha', key)}`. Only `final` "
            "belongs under a model's own parameters."
        )
    return _unknown(key, where, PER_MODEL)


def _unknown(key: str, where: str, allowed: tuple[str, ...]) -> str:
    match = difflib.get_close_matches(key.lower(), KNOWN, n=1, cutoff=0.6)
    hint = f"; did you mean `{match[0]}`?" if match else ""
    names = ", ".join(f"`{name}`" for name in allowed)
    return f"expo: unknown parameter `{key}` in {where}{hint} (expo reads {names} there)"


def _settings(value: Any) -> Iterator[tuple[Any, str | None]]:
    """(scalar, filter) pairs of a parameter setting: scalars, gradients, conditional lists."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if hasattr(item, "filter"):  # mergekit's ConditionalParameter
            for scalar, _ in _settings(item.value):
                yield scalar, item.filter
        else:
            yield item, None


def _numbers(config: Any) -> Iterator[tuple[str, str, float]]:
    for where, parameters, _, _ in parameter_scopes(config):
        for key, value in (parameters or {}).items():
            for scalar, _ in _settings(value):
                if isinstance(scalar, (int, float)) and not isinstance(scalar, bool):
                    yield where, key, float(scalar)


def filters(config: Any) -> list[tuple[str, str, str]]:
    """(where, key, filter string) of every conditional parameter value."""
    found = []
    for where, parameters, _, _ in parameter_scopes(config):
        for key, value in (parameters or {}).items():
            for _, text in _settings(value):
                if text is not None and text != "*" and (where, key, text) not in found:
                    found.append((where, key, text))
    return found


def filter_findings(config: Any, tensor_names: Iterable[str]) -> list[Finding]:
    """A filter matches a tensor when it is a substring of its name (mergekit's rule)."""
    names = sorted(set(tensor_names))
    parts = sorted({part for name in names for part in name.split(".") if not part.isdigit()})
    findings = []
    for where, key, text in filters(config):
        if any(text in name for name in names):
            continue
        match = difflib.get_close_matches(text, parts, n=1, cutoff=0.6)
        hint = f" Did you mean `{match[0]}`?" if match else ""
        findings.append(
            Finding(
                "error",
                f"expo: the filter `{text}` of `{key}` in {where} matches no tensor of this "
                f"merge, so its value would never be used (mergekit applies a filter to every "
                f"tensor whose name contains it; names look like {names[len(names) // 2]})."
                f"{hint}",
            )
        )
    return findings


# -- inputs, from headers ----------------------------------------------------------------------


def model_places(config: Any) -> list[tuple[str, Any]]:
    """(where, ModelReference) for every model the config names, in the order written."""
    found = []
    if config.base_model is not None:
        found.append(("base_model", config.base_model))

    def walk(prefix: str, owner: Any) -> None:
        for index, model in enumerate(owner.models or []):
            found.append((f"{prefix}models[{index}]", model.model))
        for index, piece in enumerate(owner.slices or []):
            if piece.base_model is not None:
                found.append((f"{prefix}slices[{index}].base_model", piece.base_model))
            for number, source in enumerate(piece.sources):
                found.append((f"{prefix}slices[{index}].sources[{number}]", source.model))

    walk("", config)
    for name, module in (config.modules or {}).items():
        walk(f"modules.{name}.", module)
    return found


def looks_local(path: str) -> bool:
    """A filesystem path, not a Hugging Face repo id (``org/name``)."""
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or "\\" in path
    )


def path_findings(config: Any, *, produced: Iterable[str] = ()) -> list[Finding]:
    """Local model paths that do not exist (mergekit would say "Repo id must be in the form")."""
    produced = {os.path.normpath(p) for p in produced}
    findings, seen = [], set()
    for where, reference in model_places(config):
        for path, what in ((reference.model.path, "model path"),
                           (reference.lora.path if reference.lora else None, "LoRA adapter")):
            if path is None or (path, where) in seen:
                continue
            seen.add((path, where))
            if os.path.normpath(path) in produced or not looks_local(path):
                continue
            if not os.path.exists(os.path.expanduser(path)):
                findings.append(
                    Finding(
                        "error",
                        f"{what} {path} does not exist ({where}). Check the path; a Hugging "
                        "Face model is written as org/name.",
                    )
                )
    return findings


def device_findings(options: Any) -> list[Finding]:
    """``--cuda`` / ``--device cuda`` where torch sees no CUDA device."""
    device = str(getattr(options, "device", None) or "cpu")
    if not device.startswith("cuda"):
        return []
    import torch

    if torch.cuda.is_available():
        return []
    why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
    return [
        Finding(
            "error",
            f"--cuda / --device {device} was given, but CUDA is not available ({why}; torch "
            f"{torch.__version__}). Drop --cuda (or use --device cpu) to merge on the CPU.",
        )
    ]


def local_dir(reference: Any) -> str | None:
    """The folder of a model given as a local path without a LoRA; None otherwise."""
    path = os.path.expanduser(reference.model.path)
    return path if reference.lora is None and os.path.isdir(path) else None


def read_inputs(config: Any) -> tuple[dict[Any, dict[str, TensorHeader]], list[Finding]]:
    """The safetensors headers of every local input; a damaged file is an error naming it."""
    headers, findings = {}, []
    for where, reference in model_places(config):
        if reference in headers:
            continue
        path = local_dir(reference)
        if path is None:
            continue
        try:
            found = read_checkpoint(path)
        except (CheckpointError, OSError) as error:
            findings.append(Finding("error", f"{error} ({where}: {reference})"))
            continue
        if found is not None:
            headers[reference] = found
    return headers, findings


def header_findings(config: Any, headers: dict[Any, dict[str, TensorHeader]]) -> list[Finding]:
    """Mixed input dtypes without ``dtype:``; embeddings tied in some inputs only."""
    findings = []
    if config.dtype is None and len(headers) > 1:
        dtypes = {
            str(model): _dominant(tensors.values()) for model, tensors in headers.items()
        }
        if len(set(dtypes.values()) - {None}) > 1:
            import torch

            promoted = None
            for name in set(dtypes.values()) - {None}:
                dtype = getattr(torch, name)
                promoted = dtype if promoted is None else torch.promote_types(promoted, dtype)
            written = config.out_dtype or str(promoted).removeprefix("torch.")
            findings.append(
                Finding(
                    "warning",
                    f"expo: the inputs have different dtypes ({dtypes}) and the config sets no "
                    f"`dtype:`: mergekit computes each tensor in the common dtype "
                    f"{str(promoted).removeprefix('torch.')} and writes {written}. Write "
                    "`dtype:` and `out_dtype:` to choose (e.g. `out_dtype: bfloat16`).",
                )
            )
    untied = {str(m): any(n.endswith("lm_head.weight") for n in t) for m, t in headers.items()}
    if len(set(untied.values())) > 1:
        with_head = [m for m, has in untied.items() if has]
        without = [m for m, has in untied.items() if not has]
        findings.append(
            Finding(
                "error",
                f"expo: the inputs disagree on tied embeddings: {with_head} have their own "
                f"lm_head.weight, {without} tie it to the embeddings (no lm_head.weight). "
                "Extrapolating between them is not defined per tensor. Save every input the "
                "same way (e.g. untie: load with transformers and save with "
                "tie_word_embeddings=False) and merge again.",
            )
        )
    return findings


def _dominant(tensors: Iterable[TensorHeader]) -> str | None:
    counts: dict[str, int] = {}
    for tensor in tensors:
        if tensor.dtype.startswith(("float", "bfloat")):
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel
    return max(counts, key=counts.get) if counts else None


def input_findings(config: Any, options: Any) -> list[Finding]:
    """Everything checkable before mergekit opens the inputs, reading headers only."""
    findings = path_findings(config) + device_findings(options)
    if any(f.level == "error" for f in findings):
        return findings
    headers, damaged = read_inputs(config)
    return findings + damaged + header_findings(config, headers)


# -- the plan ----------------------------------------------------------------------------------


def planned_tensors(tasks: Iterable[Any]) -> list[tuple[str, Any]]:
    """(output tensor name, merge task) from mergekit's ``SaveTensor``/``ReturnTensor`` list."""
    found = []
    for task in tasks:
        merge_task = getattr(task, "tensor_task", None)
        if merge_task is None:
            continue
        name = getattr(task, "tensor_name", None) or task.weight_info.name
        found.append((name, merge_task))
    return found


def _read_names(merge_task: Any) -> set[str]:
    gather = merge_task.gather_tensors
    gather = getattr(gather, "gather_tensors", gather)  # PermutedVocabulary wraps GatherTensors
    names = set()
    for weight in gather.weight_info.values():
        names.add(weight.name)
        names.update(weight.aliases or ())
        names.update(weight.tied_names or ())
    return names


def layout_names(model_type: str | None, names: Iterable[str]) -> dict[str, str | None]:
    """Checkpoint name -> the name mergekit plans with (transformers' v5 renames applied).

    mergekit reads older checkpoint layouts through transformers' conversion mapping, e.g.
    LLaVA's ``vision_tower.*`` as ``model.vision_tower.*``. ``None`` for a name that another
    kind of conversion (fusing several tensors) consumes: counted as read.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    transforms = (get_checkpoint_conversion_mapping(model_type) if model_type else None) or []
    found = {}
    for name in names:
        key: str | None = name
        for transform in transforms:
            renamed, pattern = transform.rename_source_key(key)
            if pattern is not None:
                key = renamed if isinstance(transform, WeightRenaming) else None
                if key is None:
                    break
        found[name] = key
    return found


def plan_findings(
    config: Any, planned: list[tuple[str, Any]], names_by_model: dict[Any, Iterable[str]]
) -> list[Finding]:
    """Filters that match nothing; tensors every input holds that the merge would not write.

    ``names_by_model``: each input's checkpoint tensor names.
    """
    read = set()
    for _, merge_task in planned:
        read |= _read_names(merge_task)
    findings = filter_findings(config, {name for name, _ in planned} | read)
    sets = []
    for model, names in names_by_model.items():
        layout = layout_names(model.config().model_type, names)
        sets.append({n for n, key in layout.items() if key is not None and key not in read
                     and n not in read})
    if sets:
        dropped = sorted(set.intersection(*sets))
        if dropped:
            prefixes = sorted({name.split(".")[0] for name in dropped})
            findings.append(
                Finding(
                    "error",
                    f"expo: {len(dropped)} tensors that every input holds would not be written "
                    f"(e.g. {', '.join(dropped[:3])}; under {', '.join(prefixes)}): mergekit's "
                    "architecture for these checkpoints does not cover them, so the output "
                    "would silently lack them (for LLaVA-style models, the whole language "
                    "model). Merge a checkpoint that holds only the part mergekit knows (e.g. "
                    "the language model saved on its own), or give mergekit an architecture "
                    "definition that names these tensors.",
                )
            )
    return findings
