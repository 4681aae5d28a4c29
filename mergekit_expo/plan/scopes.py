"""The one walk over an expo config: every parameter scope, every model, every output slice.

mergekit configs come in three forms (``models:``, ``slices:``, ``modules:`` holding either).
Everything that looks into a config — the plan's roles, the parameter checks, the input checks —
walks it here, so that a place is always named the same way (``models[1]``,
``slices[0].sources[1]``, ``modules.text.parameters``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scope:
    """One ``parameters:`` mapping of the config and where it sits."""

    where: str  # e.g. "parameters", "models[1].parameters", "slices[0].sources[1].parameters"
    parameters: dict | None
    model: Any  # the ModelReference whose own parameters these are; None for a shared scope
    base: Any  # θ₀ in force at this place (a slice may name its own base_model)


@dataclass(frozen=True)
class OutputSlice:
    """A part of the output made from one set of inputs (all layers for ``models:``)."""

    where: str  # "all layers", "slice 0, layers (0, 4)", "text slice 1, layers …"
    base: Any  # θ₀ for this slice
    sources: tuple[tuple[Any, dict], ...]  # (ModelReference, its own parameters), as listed
    shared: dict  # the shared settings in force (global, then module, then slice)


def scopes(config: Any) -> Iterator[Scope]:
    """Every ``parameters:`` mapping, the shared ones and each model's own, in config order."""
    base = config.base_model
    yield Scope("parameters", config.parameters, None, base)
    yield from _owner_scopes("", config, base)
    for name, module in (config.modules or {}).items():
        yield Scope(f"modules.{name}.parameters", module.parameters, None, base)
        yield from _owner_scopes(f"modules.{name}.", module, base)


def _owner_scopes(prefix: str, owner: Any, base: Any) -> Iterator[Scope]:
    for index, model in enumerate(owner.models or []):
        yield Scope(f"{prefix}models[{index}].parameters", model.parameters, model.model, base)
    for index, piece in enumerate(owner.slices or []):
        where = f"{prefix}slices[{index}]"
        slice_base = piece.base_model or base
        yield Scope(f"{where}.parameters", piece.parameters, None, slice_base)
        for number, source in enumerate(piece.sources):
            yield Scope(
                f"{where}.sources[{number}].parameters", source.parameters, source.model,
                slice_base,
            )


def setting_values(value: Any) -> Iterator[tuple[Any, str | None]]:
    """(scalar, filter) pairs of a parameter setting: scalars, gradients, conditional lists."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if hasattr(item, "filter"):  # mergekit's ConditionalParameter
            for scalar, _ in setting_values(item.value):
                yield scalar, item.filter
        else:
            yield item, None


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


def local_inputs(config: Any) -> dict[str, str]:
    """Every input on this machine's disk, labelled for messages (``models[0] (PATH)``): each
    model's folder and LoRA adapter, and a tokenizer source given as a model."""
    found: dict[str, str] = {}
    references = list(model_places(config))
    tokenizer = getattr(config, "tokenizer", None)
    source = tokenizer.source if tokenizer is not None else config.tokenizer_source
    if source is not None and hasattr(source, "model"):
        references.append(("tokenizer.source", source))
    for where, reference in references:
        for path, what in ((reference.model.path, where),
                           (reference.lora.path if reference.lora else None, f"{where} (LoRA)")):
            if path is not None and os.path.exists(os.path.expanduser(path)):
                found.setdefault(what, os.path.expanduser(path))
    return found


def output_slices(config: Any) -> list[OutputSlice]:
    """The output's slices with their inputs, for ``models:``, ``slices:`` or ``modules:``."""
    shared = dict(config.parameters or {})
    found = []
    if config.models:
        found.append(_models_slice("all layers", config.models, config.base_model, shared))
    for index, piece in enumerate(config.slices or []):
        found.append(_slice(f"slice {index}", piece, config.base_model, shared))
    for name, module in (config.modules or {}).items():
        params = {**shared, **(module.parameters or {})}
        if module.models:
            found.append(_models_slice(name, module.models, config.base_model, params))
        for index, piece in enumerate(module.slices or []):
            found.append(_slice(f"{name} slice {index}", piece, config.base_model, params))
    return found


def _models_slice(label: str, models: list, base: Any, shared: dict) -> OutputSlice:
    sources = tuple((m.model, dict(m.parameters or {})) for m in models)
    return OutputSlice(label, base, sources, shared)


def _slice(label: str, piece: Any, base: Any, shared: dict) -> OutputSlice:
    layers = sorted({tuple(s.layer_range) for s in piece.sources})
    label = f"{label}, layers {layers if len(layers) > 1 else layers[0]}"
    sources = tuple((s.model, dict(s.parameters or {})) for s in piece.sources)
    return OutputSlice(label, piece.base_model or base, sources, {**shared,
                                                                   **(piece.parameters or {})})
