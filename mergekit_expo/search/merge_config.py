"""The merge config as the α/λ search sees it: the merge's own plan, and the winner's config.

The search reads a config through the same plan as ``mergekit-yaml`` and ``mergekit-expo check``
(``mergekit_expo.plan``): the roles, the settings and, for full checkpoints, every tensor with
the dtype mergekit computes it in. A config the merge would refuse is refused here with the
merge's own message, before any weight is read; the winner's ``best.yml`` is planned again and
checked tensor by tensor against the values that were scored.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_expo.check.findings import Finding
from mergekit_expo.check.merge_start import after_plan, before_read
from mergekit_expo.errors import ExpoError
from mergekit_expo.merge.parameters import (
    ALPHA,
    DEFAULT_WARN_RELATIVE_CHANGE,
    LAMBDA,
    WARN_RELATIVE_CHANGE,
    to_number,
)
from mergekit_expo.plan import config as config_io
from mergekit_expo.plan.build import plan_config
from mergekit_expo.plan.types import Plan, SlicePlan

LOG = logging.getLogger("mergekit_expo")

GRID_PARAMETERS = (ALPHA, LAMBDA)


class SearchConfigError(ExpoError, ValueError):
    """The config cannot be searched as given; the message says what to change."""


@dataclass
class SearchConfig:
    """Everything the search needs from the YAML: the raw mapping (for ``best.yml``) and the
    plan every surface reads."""

    path: Path
    raw: dict[str, Any]  # the user's YAML as written, for --write-best
    plan: Plan
    config_lambda: float | None  # the config's scalar lambda (the default λ grid), if scalar
    warn_relative_change: float
    notes: list[str] = field(default_factory=list)  # what the search ignores, for the log

    @property
    def merge_config(self) -> Any:
        return self.plan.config

    @property
    def roles(self) -> SlicePlan:
        return self.plan.slices[0]

    @property
    def reference(self) -> Any:
        return self.roles.reference

    @property
    def final(self) -> Any:
        return self.roles.final

    @property
    def intermediates(self) -> list[Any]:
        return list(self.roles.intermediates)

    @property
    def input_dtype(self) -> str | None:
        """mergekit casts every input to ``dtype:`` before merging."""
        return self.plan.dtype

    @property
    def out_dtype(self) -> str | None:
        """mergekit casts every result to ``out_dtype:`` before writing."""
        return self.plan.out_dtype

    @property
    def uses_adapters(self) -> bool:
        """Models given as BASE+ADAPTER: candidates change LoRA scalings (adapter_candidates)."""
        return self.final.lora is not None

    def working_dtypes(self) -> dict[str, str | None]:
        """θ_T's tensor name -> the dtype the merge computes it in (None: copied)."""
        return {t.inputs[t.final]: t.working_dtype
                for t in self.plan.tensors if t.final in t.inputs}


def _refuse(path: Path, findings: list[Finding]) -> None:
    refused = [f.message for f in findings if f.level == "error"]
    if refused:
        raise SearchConfigError(f"{path}: the merge would refuse this config:\n" +
                                "\n".join(refused))


def load_search_config(path: str | Path, *, lora_merge_cache: str | None = None
                       ) -> SearchConfig:
    """Read a merge YAML for the search; raise :class:`SearchConfigError` if unusable."""
    from mergekit.options import MergeOptions

    path = Path(path)
    try:
        raw = config_io.read_raw(path)
        misspelt = config_io.misspelt_method(raw, str(path))
        if misspelt:
            raise SearchConfigError(misspelt)
        if not config_io.uses_expo(raw):
            raise SearchConfigError(
                f"{path}: merge_method is {raw.get('merge_method')!r}; the search tunes "
                "`merge_method: expo` configs only"
            )
        for form in ("slices", "modules"):
            if raw.get(form):
                raise SearchConfigError(
                    f"{path}: `{form}:` configs are not supported by the search, which sets one "
                    "global alpha and lambda for the whole model. Write the config in the plain "
                    "`base_model:` + `models:` form for the search; once the winning alpha/"
                    f"lambda is known, put it into your `{form}:` config and run mergekit-yaml."
                )
        config = config_io.validate(raw, str(path))
    except config_io.ConfigError as error:
        raise SearchConfigError(str(error)) from None
    unknown = config_io.unknown_top_level_keys(raw, str(path))
    if unknown:
        raise SearchConfigError("\n".join(unknown))
    options = MergeOptions(lora_merge_cache=lora_merge_cache)
    findings = before_read(config, options)
    _refuse(path, findings)
    plan = plan_config(config)  # its problems were refused with the merge's words above
    if not plan.slices:
        raise SearchConfigError(
            f"{path}: the search needs `base_model:` (θ₀, the SFT/reference checkpoint) and "
            "at least one other model under `models:` (the aligned/final checkpoint)"
        )
    roles = plan.slices[0]
    _check_adapter_layout(path, roles.reference, [*roles.intermediates, roles.final])
    if roles.final.lora is None:  # adapters: mergekit's planner would merge them
        plan = _planned(path, config, options)
    notes = [f.message for f in findings if f.level == "warning"]
    _scalar(roles.alpha, ALPHA, notes)  # refused if not a number; noted if a list
    lam = _scalar(roles.lam, LAMBDA, notes)
    if config.tokenizer_source is not None or config.tokenizer is not None:
        notes.append(
            "tokenizer settings are not applied by the search: it generates with the final "
            "model's tokenizer and requires every tensor to have θ₀'s shape"
        )
    warn = _scalar(roles.warn_relative_change, WARN_RELATIVE_CHANGE, notes)
    return SearchConfig(
        path=path, raw=raw, plan=plan, config_lambda=lam,
        warn_relative_change=DEFAULT_WARN_RELATIVE_CHANGE if warn is None else warn,
        notes=notes,
    )


def _planned(path: Path, config: Any, options: Any, out_path: str | None = None) -> Plan:
    """The full plan, refused as the merge would refuse it."""
    from mergekit_expo.plan.tasks import planned_tasks

    try:
        tasks = planned_tasks(config, options)
    except Exception as error:  # noqa: BLE001 - the merge would fail the same way
        raise SearchConfigError(
            f"{path}: mergekit cannot plan this merge: {type(error).__name__}: {error}"
        ) from None
    plan, findings = after_plan(config, tasks, out_path)
    _refuse(path, findings)
    assert plan is not None  # no findings without a plan
    return plan


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
    parameters[ALPHA] = alpha
    if lam or LAMBDA in parameters or search.intermediates:
        parameters[LAMBDA] = lam
    raw["parameters"] = parameters
    for entry in raw.get("models") or []:
        if isinstance(entry, dict) and isinstance(entry.get("parameters"), dict):
            for name in GRID_PARAMETERS:
                entry["parameters"].pop(name, None)
    return raw


def verify_best(search: SearchConfig, best: dict[str, Any],
                scored: Callable[[str], tuple[float, float]]) -> Plan:
    """Plan ``best.yml`` as the merge will, and check every tensor gets the (α, λ) it was scored
    with (``scored``: θ_T's tensor name -> (α, λ)); raise naming the first that does not.

    Adapter configs get the merge's start checks only: planning them would merge every adapter
    into a full model (their candidates change one scaling, the same for every tensor).
    """
    from mergekit.options import MergeOptions

    config = config_io.validate(best, f"{search.path.name} (the winner's config)")
    _refuse(search.path, before_read(config, MergeOptions()))
    if search.uses_adapters:
        return plan_config(config)
    plan = _planned(search.path, config, MergeOptions())
    for tensor in plan.tensors:
        if tensor.working_dtype is None or tensor.final not in tensor.inputs:
            continue  # copied from θ_T, whatever α says
        want = scored(tensor.inputs[tensor.final])
        if (tensor.alpha, tensor.lam) != tuple(float(v) for v in want):
            raise SearchConfigError(
                f"the winner's config gives tensor {tensor.name} alpha = {tensor.alpha:g}, "
                f"lambda = {tensor.lam:g}, but it was scored with alpha = {want[0]:g}, "
                f"lambda = {want[1]:g}; best.yml is not written (please report this)"
            )
    return plan


def values_by_tensor(assignment: Mapping[str, str], values: Mapping[str, Any]
                     ) -> Callable[[str], tuple[float, float]]:
    """θ_T's tensor name -> the (α, λ) of its group, for :func:`verify_best`."""
    def scored(name: str) -> tuple[float, float]:
        group = assignment.get(name, assignment.get("*"))
        alpha, lam = values[group]
        return float(alpha), float(lam)

    return scored


def _scalar(value: Any, name: str, notes: list[str]) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (list, dict)) and not hasattr(value, "model_dump"):
        try:
            return to_number(name, value)
        except ValueError as error:
            raise SearchConfigError(str(error)) from None
    if name in GRID_PARAMETERS:
        notes.append(
            f"{name} in the config is not a single number ({value!r}); the search ignores it "
            f"and uses one global {name} per candidate from the grid, and --write-best writes "
            "the winning scalar in its place"
        )
    return None
