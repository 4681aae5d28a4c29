"""Build the plan of an expo merge: from the config alone, or with every planned tensor.

``plan_config`` reads what the config says (roles, α/λ settings, dtypes) and refuses what no
merge could do as written. ``build_plan`` adds the tensors: it runs mergekit's own planner (on a
copy of the config; nothing is read but configs and headers, nothing written) or takes the tasks
of the planner that is about to run the merge, so that α, λ and the roles of every tensor are
exactly the values mergekit hands the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import MappingProxyType as frozen
from typing import Any

from mergekit_expo.errors import ExpoError
from mergekit_expo.merge.parameters import (
    ALPHA,
    DEFAULT_ALPHA,
    DEFAULT_LAMBDA,
    DEFAULT_WARN_RELATIVE_CHANGE,
    LAMBDA,
    SHARED,
    WARN_RELATIVE_CHANGE,
    to_number,
)
from mergekit_expo.merge.roles import pick_final
from mergekit_expo.plan import config as config_io
from mergekit_expo.plan.dtypes import DtypeError, dtype_name, output_dtype, working_dtype
from mergekit_expo.plan.headers import read_model_headers
from mergekit_expo.plan.scopes import output_slices, scopes, setting_values
from mergekit_expo.plan.types import Plan, SlicePlan, TensorPlan


class PlanError(ExpoError, ValueError):
    """The config cannot be merged as written; the message lists every reason, each naming the
    file, key or model."""


def load(source: Any) -> Any:
    """A MergeConfiguration of its own from a path, a mapping or a MergeConfiguration."""
    if isinstance(source, (str, Path)):
        return config_io.validate(config_io.read_raw(source), str(source))
    if isinstance(source, dict):
        return config_io.validate(source, "the config")
    return source.model_copy(deep=True)  # the plan's own copy


def final_problems(config: Any) -> list[str]:
    """``final`` must be a YAML boolean: mergekit would read ``'yes'``, ``1`` or ``'true'`` as
    true while a reader that tests ``is True`` would not."""
    problems = []
    for scope in scopes(config):
        if scope.model is None or "final" not in (scope.parameters or {}):
            continue
        value = scope.parameters["final"]
        if not isinstance(value, bool):
            problems.append(
                f"expo: `final: {value!r}` in {scope.where} is not a boolean: write "
                "`final: true` (or leave it out; the last model listed is θ_T)"
            )
    return problems


def dtype_problems(config: Any) -> list[str]:
    problems = []
    for key in ("dtype", "out_dtype"):
        try:
            dtype_name(getattr(config, key), key)
        except DtypeError as error:
            problems.append(str(error))
    return problems


def _nonzero(setting: Any) -> bool:
    """Any non-zero number in a setting (a scalar, a gradient or a filter list)."""
    return any(isinstance(value, (int, float)) and not isinstance(value, bool) and value
               for value, _ in setting_values(setting))


def _number_problems(shared: Any) -> list[str]:
    """alpha, lambda and warn_relative_change where one of their values is not a finite number
    (``alpha: lots``): refused with the plan, before mergekit reads a tensor."""
    problems = []
    for name in SHARED:
        if name in shared:
            for value, _ in setting_values(shared[name]):
                try:
                    to_number(name, value)
                except ValueError as error:
                    problems.append(str(error))
    return problems


def slice_plans(config: Any) -> tuple[list[SlicePlan], list[str]]:
    """Roles and settings per output slice; problems that no merge of it could get past."""
    plans, problems = [], []
    for piece in output_slices(config):
        base = piece.base
        non_base = [(model, params) for model, params in piece.sources if model != base]
        if base is None:
            problems.append(
                f"expo needs a reference model θ₀ ({piece.where}): set `base_model:` to the SFT "
                "checkpoint the aligned model was trained from"
            )
            continue
        if not non_base:
            problems.append(
                f"expo needs at least one model besides base_model {base} ({piece.where}): "
                "list the aligned (final) checkpoint under `models:`"
            )
            continue
        marked = [m for m, p in non_base if p.get("final") is True]
        try:
            final = pick_final([m for m, _ in non_base], marked)
        except ValueError as error:
            problems.append(f"{error} ({piece.where})")
            continue
        intermediates = tuple(m for m, _ in non_base if m != final)
        numbers = _number_problems(piece.shared)
        if numbers:
            problems += [f"{problem} ({piece.where})" for problem in numbers]
            continue
        alpha = piece.shared.get(ALPHA, DEFAULT_ALPHA)
        lam = piece.shared.get(LAMBDA, DEFAULT_LAMBDA)
        warn = piece.shared.get(WARN_RELATIVE_CHANGE, DEFAULT_WARN_RELATIVE_CHANGE)
        if not intermediates and _nonzero(lam):
            problems.append(
                f"expo: lambda is set ({piece.where}), but no intermediate checkpoint is listed "
                f"(only the final model {final}). List the iterative-DPO checkpoints (or one "
                "averaged model) before the final one, or set lambda: 0 for plain ExPO."
            )
        plans.append(SlicePlan(piece.where, base, final, intermediates, alpha, lam, warn))
    return plans, problems


def config_problems(config: Any) -> list[str]:
    """Everything about the config alone that no merge of it could get past."""
    return final_problems(config) + dtype_problems(config) + slice_plans(config)[1]


def plan_config(source: Any) -> Plan:
    """The config-level plan (roles, settings, dtypes); raises :class:`PlanError`."""
    config = load(source)
    problems = config_problems(config)
    if problems:
        raise PlanError("\n".join(problems))
    slices, _ = slice_plans(config)
    return Plan(
        config=config,
        dtype=dtype_name(config.dtype, "dtype"),
        out_dtype=dtype_name(config.out_dtype, "out_dtype"),
        slices=tuple(slices),
    )


def build_plan(source: Any, *, options: Any = None, tasks: Iterable[Any] | None = None) -> Plan:
    """The full plan: every tensor mergekit plans, with its roles, α, λ, dtypes and shape.

    ``tasks``: the planner's tasks of the merge about to run (else mergekit's planner is run
    here on a copy of the config). Raises :class:`PlanError` for the config and for a tensor
    the kernel would refuse (λ ≠ 0 where no intermediate is listed).
    """
    from mergekit_expo.plan.tasks import planned_tasks, task_inputs, tensor_tasks

    base = plan_config(source)
    headers, damaged = read_model_headers(base.config)
    if damaged:
        raise PlanError("\n".join(message for _, message in damaged))
    if tasks is None:
        tasks = planned_tasks(base.config, options)
    tensors, problems = [], []
    planned = [(name, task_inputs(task)) for name, task in tensor_tasks(tasks)]
    planned_names = _planned_names(headers, [found for _, found in planned])
    by_plan_name = {model: {**{planned_names[model][n] or n: h for n, h in found.items()},
                            **found}
                    for model, found in headers.items()}
    for name, found in planned:
        tensor = _tensor_plan(base, name, found, by_plan_name)
        if tensor.lam and not tensor.intermediates:
            problems.append(
                f"expo: lambda = {tensor.lam:g} for tensor {name}, but no intermediate "
                f"checkpoint is listed (only the final model {tensor.final}). List the "
                "iterative-DPO checkpoints before the final one, or set lambda: 0 there."
            )
        tensors.append(tensor)
    if problems:
        raise PlanError("\n".join(problems[:5] + ([f"… {len(problems) - 5} more"]
                                                   if len(problems) > 5 else [])))
    return Plan(
        config=base.config, dtype=base.dtype,
        out_dtype=base.out_dtype, slices=base.slices, tensors=tuple(tensors),
        headers=frozen({model: frozen(found) for model, found in headers.items()}),
        planned_names=frozen({model: frozen(names) for model, names in planned_names.items()}),
    )


def _tensor_plan(base: Plan, name: str, found: Any, headers) -> TensorPlan:
    """``found``: what the planner's task says about the tensor (``tasks.TaskInputs``)."""
    reference, models = found.reference, found.models
    non_base = [m for m in models if m != reference]
    marked = [m for m in non_base if (found.per_model.get(m) or {}).get("final")]
    final = pick_final(non_base, marked) if non_base else None
    shapes, stored = {}, {}
    for model in models:
        header = _header(headers.get(model), found.reads.get(model, ()))
        if header is not None:
            shapes[model] = header.shape
            stored[model] = header.dtype
    dtypes = list(stored.values())
    working = working_dtype(base.dtype, dtypes) if dtypes else base.dtype
    written = output_dtype(base.out_dtype, working, dtypes[0]) if dtypes else base.out_dtype
    final_shape = shapes.get(final) or next(iter(shapes.values()), None)
    return TensorPlan(
        name=name, reference=reference, final=final,
        intermediates=tuple(m for m in non_base if m != final),
        alpha=float(found.shared[ALPHA]), lam=float(found.shared[LAMBDA]),
        inputs=frozen(found.inputs), reads=frozen(found.reads), optional=found.optional,
        vocabulary_aligned=found.vocabulary_aligned, shapes=frozen(shapes),
        input_dtypes=frozen(stored),
        working_dtype=working, output_dtype=written, shape=final_shape,
    )


def _header(tensors: Any, names: tuple[str, ...]) -> Any:
    """The header of the first of ``names`` a checkpoint holds (planned names are after
    transformers' renames: see ``_planned_names``)."""
    if not tensors:
        return None
    for name in names:
        if name in tensors:
            return tensors[name]
    return None


def _planned_names(headers: dict, planned: list) -> dict:
    """Per model, checkpoint name -> the name mergekit plans with (transformers' renames).

    Only names the plan does not read as they are need a rename: a checkpoint name that is
    read is its own planned name, and a lookup whose first name the checkpoint holds finds it
    before any renamed one (``_header``). A model all of whose names are read, and which holds
    the first name of each of its reads, keeps its names without asking transformers, whose
    table of renames (for every model type at once) takes longer to build than the rest of the
    plan.
    """
    from mergekit_expo.patches.reads import checkpoint_renames

    read: set[str] = set()
    first: dict = {}
    for found in planned:
        for model, names in found.reads.items():
            read.update(names)
            if names:
                first.setdefault(model, set()).add(names[0])
    found_names = {}
    for model, tensors in headers.items():
        if read.issuperset(tensors) and first.get(model, set()).issubset(tensors):
            found_names[model] = {name: name for name in tensors}
        else:
            found_names[model] = checkpoint_renames(model.config().model_type, tensors)
    return found_names
