"""What the plan reads of mergekit's planner: the tasks it makes, and what each one carries.

mergekit's ``MergePlanner`` resolves α, λ and ``final`` for every tensor (filters, gradients,
defaults) and names each input's tensor. The plan takes exactly those values rather than
resolving them a second way. The task fields read here, ``mergekit.merge._model_out_config`` and
mergekit's process-wide ``LoaderCache`` go through their records in ``patches.reads``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


def planned_tasks(config: Any, options: Any = None) -> list[Any]:
    """mergekit's plan of ``config`` (on a deep copy: the planner rewrites it).

    Reads the inputs' ``config.json`` and tensor indexes, no tensor.
    """
    from mergekit.architecture import get_architecture_info
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    from mergekit_expo.patches.reads import loader_cache_for, model_out_config, original

    options = options or MergeOptions()
    work = config.model_copy(deep=True)
    arch_info = original(get_architecture_info)(work, options)
    with loader_cache_for(options):
        out_config = model_out_config(work, arch_info,
                                      trust_remote_code=options.trust_remote_code)
        planner = MergePlanner(work, arch_info, options=options, out_model_config=out_config)
        # the task graph only: its writer task would create the folder if it were executed
        # (mergekit 0.1.5's plan_in_memory cannot build its ReturnTensor tasks)
        return original(MergePlanner.plan_to_disk)(planner, out_path="(not written)")


def tensor_tasks(tasks: Iterable[Any]) -> list[tuple[str, Any]]:
    """(output tensor name, merge task) from ``SaveTensor`` / ``ReturnTensor`` tasks."""
    from mergekit_expo.patches.reads import planned_task_fields

    planned_task_fields()
    found = []
    for task in tasks:
        merge_task = getattr(task, "tensor_task", None)
        if merge_task is None:
            continue
        name = getattr(task, "tensor_name", None) or task.weight_info.name
        found.append((name, merge_task))
    return found


@dataclass(frozen=True)
class TaskInputs:
    """What one ``ExecuteMergeMethodTask`` says about its tensor."""

    reference: Any  # θ₀ (the task's base model)
    models: list[Any]  # every input, in the planner's order
    inputs: dict[Any, str]  # model -> its tensor name
    reads: dict[Any, tuple[str, ...]]  # model -> every name it may be read under
    shared: dict[str, Any]  # alpha, lambda, ... as mergekit resolved them for this tensor
    per_model: dict[Any, dict[str, Any]]  # final, per input
    optional: bool
    vocabulary_aligned: bool


def task_inputs(task: Any) -> TaskInputs:
    gather = gather_of(task)
    weights = dict(gather.weight_info.items())
    return TaskInputs(
        reference=task.base_model,
        models=list(task.model_order),
        inputs={model: weight.name for model, weight in weights.items()},
        reads={model: _names(weight) for model, weight in weights.items()},
        shared=dict(task.parameters),
        per_model={model: dict(values) for model, values in task.input_parameters.items()},
        optional=bool(task.output_weight.optional),
        vocabulary_aligned=gather is not task.gather_tensors,
    )


def _names(weight: Any) -> tuple[str, ...]:
    return (weight.name, *(weight.aliases or ()), *(weight.tied_names or ()))


def gather_of(task: Any) -> Any:
    """The ``GatherTensors`` under a merge task (vocabulary tasks wrap it)."""
    gather = task.gather_tensors
    return getattr(gather, "gather_tensors", gather)
