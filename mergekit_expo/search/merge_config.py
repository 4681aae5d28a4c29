"""The merge config as the α/λ search sees it: roles, dtypes, and the winner's config.

The search reads the same YAML as ``mergekit-yaml`` and must treat it exactly as the merge does
(roles from :func:`mergekit_expo.merge.roles.slice_roles`, ``dtype``/``out_dtype`` casts), so
that the winner written back with ``--write-best`` is the model that was scored. What the search
cannot reproduce it refuses up front, before any weight is read.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_expo.merge import METHOD_NAME

LOG = logging.getLogger("mergekit_expo")

GRID_PARAMETERS = ("alpha", "lambda")
# Parameters the search understands besides the grid; anything else is passed through untouched.
KNOWN_SHARED = {"warn_relative_change"}
KNOWN_PER_MODEL = {"final"}


class SearchConfigError(ValueError):
    """The config cannot be searched as given; the message says what to change."""


@dataclass
class SearchConfig:
    """Everything the search needs from the YAML, validated once."""

    path: Path
    raw: dict[str, Any]  # the user's YAML as written, for --write-best
    merge_config: Any  # mergekit.config.MergeConfiguration
    reference: Any  # ModelReference θ₀
    final: Any  # ModelReference θ_T
    intermediates: list[Any]  # ModelReference, averaged into θ̄
    config_alpha: float | None  # the config's scalar alpha/lambda, if scalar
    config_lambda: float | None
    warn_relative_change: float
    notes: list[str] = field(default_factory=list)  # what the search ignores, for the log

    @property
    def input_dtype(self) -> str | None:
        """mergekit casts every input to ``dtype:`` before merging."""
        return self.merge_config.dtype

    @property
    def uses_adapters(self) -> bool:
        """Models given as BASE+ADAPTER: candidates change LoRA scalings (adapter_candidates)."""
        return self.final.lora is not None

    @property
    def out_dtype(self) -> str | None:
        """mergekit casts every result to ``out_dtype:`` before writing."""
        return self.merge_config.out_dtype


def load_search_config(path: str | Path) -> SearchConfig:
    """Parse and check a merge YAML for the search; raise :class:`SearchConfigError` if unusable."""
    from mergekit.config import MergeConfiguration

    from mergekit_expo.merge.parameters import DEFAULT_WARN_RELATIVE_CHANGE
    from mergekit_expo.merge.roles import slice_roles

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise SearchConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(raw, dict):
        raise SearchConfigError(f"{path}: expected a YAML mapping (a mergekit merge config)")
    if raw.get("merge_method") != METHOD_NAME:
        raise SearchConfigError(
            f"{path}: merge_method is {raw.get('merge_method')!r}; the search tunes "
            f"`merge_method: {METHOD_NAME}` configs only"
        )
    for form in ("slices", "modules"):
        if raw.get(form):
            raise SearchConfigError(
                f"{path}: `{form}:` configs are not supported by the search, which sets one "
                "global alpha and lambda for the whole model. Write the config in the plain "
                "`base_model:` + `models:` form for the search; once the winning alpha/lambda "
                f"is known, put it into your `{form}:` config and run mergekit-yaml."
            )
    try:
        config = MergeConfiguration.model_validate(raw)
    except Exception as error:  # pydantic's message is precise; keep it
        raise SearchConfigError(f"{path}: not a valid mergekit config: {error}") from None

    found = slice_roles(config)
    if config.base_model is None or not found:
        raise SearchConfigError(
            f"{path}: the search needs `base_model:` (θ₀, the SFT/reference checkpoint) and "
            "at least one other model under `models:` (the aligned/final checkpoint)"
        )
    roles = found[0]
    by_name = {str(m.model): m.model for m in config.models}
    by_name[str(config.base_model)] = config.base_model
    _check_adapter_layout(path, config.base_model, [m.model for m in config.models])
    notes: list[str] = []
    shared = dict(config.parameters or {})
    alpha = _scalar(shared.get("alpha"), "alpha", notes)
    lam = _scalar(shared.get("lambda"), "lambda", notes)
    for name in sorted(set(shared) - set(GRID_PARAMETERS) - KNOWN_SHARED):
        notes.append(f"parameter {name!r} is not an expo parameter; it is passed through unused")
    for entry in config.models:
        for name in sorted(set(entry.parameters or {}) - KNOWN_PER_MODEL):
            what = "ignored: the grid sets one global value" if name in GRID_PARAMETERS else (
                "unused by expo"
            )
            notes.append(f"per-model parameter {name!r} of {entry.model} is {what}")
    if config.tokenizer_source is not None or config.tokenizer is not None:
        notes.append(
            "tokenizer settings are not applied by the search: it generates with the final "
            "model's tokenizer and requires every tensor to have θ₀'s shape"
        )
    warn = shared.get("warn_relative_change", DEFAULT_WARN_RELATIVE_CHANGE)
    return SearchConfig(
        path=path,
        raw=raw,
        merge_config=config,
        reference=config.base_model,
        final=by_name[roles["final"]],
        intermediates=[by_name[name] for name in roles["intermediates"]],
        config_alpha=alpha,
        config_lambda=lam,
        warn_relative_change=float(warn) if isinstance(warn, (int, float)) else 0.25,
        notes=notes,
    )


def _check_adapter_layout(path: Path, base, models: list) -> None:
    """Adapters (`BASE+ADAPTER`) are searched by scaling: all over one BASE, θ₀ = BASE or
    BASE+ADAPTER, no full checkpoint mixed in (docs/lora.md)."""
    if not any(m.lora is not None for m in (base, *models)):
        return
    bases = {str(m.model) for m in (base, *models)}
    plain = [str(m) for m in models if m.lora is None]
    if len(bases) > 1 or plain:
        raise SearchConfigError(
            f"{path}: the search takes either full checkpoints or adapters over one base model "
            f"(`base_model: BASE`, models `BASE+ADAPTER`); this config has base models "
            f"{sorted(bases)}" + (f" and full checkpoints {plain}" if plain else "")
            + ". Merge the adapters into full checkpoints (peft's merge_and_unload) and list "
            "those instead."
        )


def best_config(search: SearchConfig, alpha: float, lam: float) -> dict[str, Any]:
    """The user's config with the winning α (and λ) as the global scalar values.

    Per-model alpha/lambda and any filter/gradient form are replaced, since the search scored
    one global value; everything else is kept as written.
    """
    raw = copy.deepcopy(search.raw)
    parameters = dict(raw.get("parameters") or {})
    parameters["alpha"] = alpha
    if lam or "lambda" in parameters or search.intermediates:
        parameters["lambda"] = lam
    raw["parameters"] = parameters
    for entry in raw.get("models") or []:
        if isinstance(entry, dict) and isinstance(entry.get("parameters"), dict):
            for name in GRID_PARAMETERS:
                entry["parameters"].pop(name, None)
    return raw


def _scalar(value: Any, name: str, notes: list[str]) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    notes.append(
        f"{name} in the config is not a single number ({value!r}); the search ignores it and "
        f"uses one global {name} per candidate from the grid, and --write-best writes the "
        "winning scalar in its place"
    )
    return None
