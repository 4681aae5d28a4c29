"""How ``expo`` joins the unmodified mergekit tools: registration plus small extensions.

Each ``after_*`` function runs right after the module it names has executed (the start-up hook,
``mergekit_expo._startup``, lists them), or from ``mergekit_expo.register()``. All are
idempotent. At hook time only the registration (``merge.method``) and the card section
(``merge.card``, which needs no mergekit) import our modules; the wrappers of mergekit's tasks
import theirs when they run, because mergekit may still be half-imported when the hooks do.

- ``mergekit.merge_methods``: register the method by name.
- ``mergekit_expo.merge.method``: the same, when it was imported before mergekit had finished.
- ``mergekit.card``: add a section naming θ₀, θ_T, the intermediates, α and λ to the card.
- ``mergekit.tokenizer.embed``: remember vocabulary rows the reference lacks (``guards``).
- ``mergekit.io.tasks``: refuse a non-finite tensor after the ``out_dtype`` cast.
- ``mergekit.merge``: an expo merge writes into a staging folder and moves into place only when
  complete (``merge.output``).
- ``mergekit.scripts.multimerge``: check every expo step of a ``mergekit-multi`` file before the
  first one runs; a lazy run does not skip an expo step whose folder holds a model merged from
  another config.
- ``mergekit.architecture``: check an expo config and its inputs' headers (``validation``)
  before mergekit reads anything.
- ``mergekit.plan``: check the planned merge (filters, tensors it would drop, free disk space,
  chat template: ``validation``, ``forecast``) before any tensor is read.
- ``mergekit.merge_methods.task_adapter``: hand the kernel the vocabulary rows recorded for its
  own input task (``guards``), whatever device mergekit copied the tensors to.

Each hook first checks that what it wraps is still there with the signature it calls
(``_expect``). On a mismatch, or when a hooked module cannot be found, it leaves mergekit as it
is, logs a warning naming the feature that is lost (``FEATURES``) and records it in ``LOST``; an
expo merge that needs a lost guard is then refused (``refuse_without_lost_guards``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import inspect
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from mergekit_expo.merge import METHOD_NAME

LOG = logging.getLogger("mergekit_expo")
_MARK = "__mergekit_expo__"
SUPPORTED = "mergekit-expo supports mergekit >=0.1.5,<0.2"

# what each hook gives, in the words of the warning when it cannot be installed
FEATURES = {
    "after_merge_methods": "`merge_method: expo` is not registered",
    "after_method": "`merge_method: expo` is not registered",
    "after_card": "the model card's section naming θ₀, θ_T, α and λ is off",
    "after_embed": (
        "the guard that keeps vocabulary rows θ₀ lacks out of the extrapolation "
        "(`tokenizer:` / `tokenizer_source:`) is off"
    ),
    "after_io_tasks": "the out_dtype overflow guard is off",
    "after_merge": (
        "expo merges write into the output folder in place: an interrupted merge can leave an "
        "incomplete or mixed model there"
    ),
    "after_multimerge": (
        "mergekit-multi skips an expo step whose folder holds a model merged from another config"
    ),
    "validate_multimerge": "mergekit-multi steps are checked only when each one starts",
    "after_task_adapter": (
        "the guard that keeps vocabulary rows θ₀ lacks out of the extrapolation "
        "(`tokenizer:` / `tokenizer_source:`) is off"
    ),
    "after_architecture": "expo configs and inputs are not checked before the merge reads them",
    "after_plan": (
        "planned expo merges are not checked (unmatched filters, dropped tensors, free disk, "
        "chat template)"
    ),
}
# Features lost in this process (hook -> why). Process-wide like the hooks themselves: what
# mergekit looks like does not change within a process.
LOST: dict[str, str] = {}


def run_hook(hook: str, module: ModuleType, table: dict[str, str]) -> None:
    """Run one ``after_*`` hook; a failure leaves mergekit usable and says what is lost.

    With the registry (imported by every merge), the other modules of the start-up hook's
    ``table`` are looked up too, so that one that moved is named rather than silently missed.
    """
    try:
        apply(hook, module)
        if hook == "after_merge_methods":
            check_hooked_modules(table)
    except Exception as error:  # noqa: BLE001 - never break mergekit's own import
        lose(hook, f"extending {module.__name__} failed ({type(error).__name__}: {error})")


def lose(hook: str, why: str) -> None:
    """Record and announce (once) that the feature ``hook`` gives is off in this process."""
    if hook not in LOST:
        LOST[hook] = why
        LOG.warning("mergekit-expo: %s; %s (%s)", why, FEATURES[hook], SUPPORTED)


def _expect(owner: Any, name: str, parameters: tuple[str, ...], hook: str) -> Any:
    """``owner.name`` if it exists and takes exactly ``parameters``; else record the loss."""
    where = f"{getattr(owner, '__module__', '')}.{getattr(owner, '__qualname__', owner)}"
    where = getattr(owner, "__name__", where) if isinstance(owner, ModuleType) else where
    value = getattr(owner, name, None)
    if value is None:
        lose(hook, f"mergekit's {where} has no {name}")
        return None
    try:
        found = tuple(inspect.signature(inspect.unwrap(value)).parameters)
    except (TypeError, ValueError):
        found = None
    if found != parameters:
        lose(hook, f"mergekit's {where}.{name} takes {found}, not {parameters}")
        return None
    return value


def _expect_fields(model: Any, fields: tuple[str, ...], hook: str) -> bool:
    """The pydantic task ``model`` still declares ``fields`` (read by our wrapper)."""
    missing = [f for f in fields if f not in getattr(model, "model_fields", {})]
    if missing:
        lose(hook, f"mergekit's {model.__module__}.{model.__qualname__} has no {missing}")
    return not missing


def _expect_task(module: ModuleType, name: str, parameters: tuple[str, ...],
                 fields: tuple[str, ...], hook: str) -> Any:
    """mergekit's task class ``module.name`` if its ``execute`` takes ``parameters`` and it
    declares ``fields``; else the loss is recorded and None returned."""
    task = getattr(module, name, None)
    if task is None:
        lose(hook, f"mergekit's {module.__name__} has no {name}")
        return None
    if _expect(task, "execute", parameters, hook) and _expect_fields(task, fields, hook):
        return task
    return None


def check_hooked_modules(table: dict[str, str]) -> None:
    """Each mergekit module of ``table`` can be found; one that moved loses its feature.

    Looks the files up without importing them (mergekit may be half-imported right now).
    """
    for name, hook in table.items():
        if not name.startswith("mergekit.") or name in sys.modules:
            continue
        parts, path = name.split("."), None
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            package = sys.modules.get(prefix)
            if package is not None and depth < len(parts):
                path = getattr(package, "__path__", None)
                continue
            spec = importlib.machinery.PathFinder.find_spec(prefix, path)
            if spec is None:
                lose(hook, f"mergekit has no module {name}")
                break
            path = spec.submodule_search_locations


_ADVICE = {
    "after_io_tasks": "remove out_dtype: from the config or ",
    "after_embed": "remove tokenizer: / tokenizer_source: from the config or ",
    "after_task_adapter": "remove tokenizer: / tokenizer_source: from the config or ",
}


def refuse_without_lost_guards(merge_config: Any) -> None:
    """An expo merge that needs a guard which could not be installed is refused, not run."""
    vocabulary = bool(merge_config.tokenizer or merge_config.tokenizer_source)
    needs = {
        "after_io_tasks": bool(merge_config.out_dtype),
        "after_embed": vocabulary,
        "after_task_adapter": vocabulary,
        "after_architecture": True,  # without the config checks a typo would pass silently
        "after_plan": True,
    }
    for hook, needed in needs.items():
        if needed and hook in LOST:
            raise RuntimeError(
                f"expo: refusing this merge: {FEATURES[hook]} because {LOST[hook]} "
                f"({SUPPORTED}); {_ADVICE.get(hook, '')}install a supported mergekit"
            )


def apply(hook: str, module: ModuleType) -> None:
    """Run the ``after_*`` function named ``hook`` on ``module``; errors propagate."""
    globals()[hook](module)


def after_merge_methods(merge_methods: ModuleType) -> None:
    method_module = sys.modules.get("mergekit_expo.merge.method")
    if method_module is not None and not hasattr(method_module, "expo_method"):
        return  # merge.method is importing mergekit right now: after_method registers it
    from mergekit_expo.merge.method import expo_method

    if not (
        _expect(merge_methods, "register", ("method",), "after_merge_methods")
        and _expect(merge_methods, "registered_methods", (), "after_merge_methods")
    ):
        return
    names = {method.spec.name: method for method in merge_methods.registered_methods()}
    existing = names.get(METHOD_NAME)
    if existing is None:
        merge_methods.register(expo_method)
    elif not isinstance(existing, type(expo_method)):
        raise RuntimeError(
            f"another merge method is already registered as {METHOD_NAME!r}: {existing!r}"
        )


def after_method(method: ModuleType) -> None:
    """``merge.method`` has executed; if it came first, mergekit could not register it yet."""
    after_merge_methods(importlib.import_module("mergekit.merge_methods"))


def after_card(card: ModuleType) -> None:
    from mergekit_expo.merge.card import add_roles_section

    if not _expect(card, "generate_card", ("config", "config_yaml", "name"), "after_card"):
        return

    def wrap(original: Callable) -> Callable:
        def generate_card(config, config_yaml, name=None):
            text = original(config=config, config_yaml=config_yaml, name=name)
            return add_roles_section(text, config)

        return generate_card

    _rebind_in_merge("generate_card", _wrap_once(card, "generate_card", wrap))


def after_embed(embed: ModuleType) -> None:
    parameters = ("self", "tokenizer_info", "tensors")
    if not _expect_task(embed, "PermutedVocabulary", parameters, ("base_model",), "after_embed"):
        return

    def wrap(original: Callable) -> Callable:
        def execute(self, tokenizer_info, tensors):
            from mergekit_expo.merge.guards import record_rows_reference_lacks

            result = original(self, tokenizer_info=tokenizer_info, tensors=tensors)
            base = self.base_model
            if base is not None and base in result and base in tokenizer_info.permutations:
                record_rows_reference_lacks(
                    self,
                    tokenizer_info.permutations[base],
                    list(tokenizer_info.tokenizer.get_vocab().values()),
                )
            return result

        return execute

    _wrap_once(embed.PermutedVocabulary, "execute", wrap)


def after_io_tasks(tasks: ModuleType) -> None:
    fields = ("dtype", "tensor_task", "tensor_name")
    if not _expect_task(tasks, "SaveTensor", ("self", "writer", "tensor"), fields,
                        "after_io_tasks"):
        return

    def wrap(original: Callable) -> Callable:
        def execute(self, writer, tensor):
            if tensor is not None and self.dtype and tensor.is_floating_point():
                method = _method_of(self.tensor_task, self.tensor_name)
            else:
                method = None
            if method == METHOD_NAME:
                import torch
                from mergekit.common import dtype_from_name

                from mergekit_expo.merge.guards import NonFiniteError, overflow_message

                tensor = tensor.to(dtype=dtype_from_name(self.dtype))
                if not bool(torch.isfinite(tensor).all()):
                    raise NonFiniteError(overflow_message(self.tensor_name, tensor.dtype))
            return original(self, writer=writer, tensor=tensor)

        return execute

    _wrap_once(tasks.SaveTensor, "execute", wrap)


def _method_of(task: Any, tensor_name: str) -> str | None:
    """The merge method that made a saved tensor; refuses when mergekit no longer says."""
    method = getattr(task, "method_name", None)
    if method is None and type(task).__name__ == "ExecuteMergeMethodTask":
        raise RuntimeError(
            f"mergekit-expo cannot tell which merge method made tensor {tensor_name} "
            f"(ExecuteMergeMethodTask has no method_name), so the out_dtype overflow guard "
            f"cannot run; refusing to write it unchecked ({SUPPORTED})"
        )
    return method


def after_merge(merge: ModuleType) -> None:
    task_adapter = sys.modules.get("mergekit.merge_methods.task_adapter")
    execute_task = getattr(task_adapter, "ExecuteMergeMethodTask", None)
    if execute_task is None or "method_name" not in getattr(execute_task, "model_fields", {}):
        lose("after_io_tasks", "mergekit's ExecuteMergeMethodTask has no method_name")
    parameters = ("merge_config", "out_path", "options", "config_source")
    if not _expect(merge, "run_merge", parameters, "after_merge"):
        return

    def wrap(original: Callable) -> Callable:
        def run_merge(merge_config, out_path, options, config_source=None):
            from mergekit_expo.merge.validation import uses_expo

            if not uses_expo(merge_config):
                return original(merge_config, out_path, options=options,
                                config_source=config_source)
            from mergekit_expo.merge.output import staged

            refuse_without_lost_guards(merge_config)
            if config_source is None:  # before mergekit rewrites the config into slices
                config_source = merge_config.to_yaml()

            with staged(out_path) as staging:
                return original(merge_config, staging, options=options,
                                config_source=config_source)

        return run_merge

    run_merge = _wrap_once(merge, "run_merge", wrap)
    for name in ("mergekit.scripts.run_yaml", "mergekit.scripts.multimerge"):
        holder = sys.modules.get(name)  # imported before us: holds the unwrapped function
        if holder is not None and hasattr(holder, "run_merge"):
            holder.run_merge = run_merge


def _rerun_stale_steps(multimerge: ModuleType) -> None:
    fields = ("config_yaml", "out_path", "lazy", "name")
    task = _expect_task(multimerge, "MergeModelTask", ("self", "kwargs"), fields,
                        "after_multimerge")
    if task is None:
        return

    def wrap(original: Callable) -> Callable:
        def execute(self, **kwargs):
            if self.lazy and _stale_expo_step(self.config_yaml, self.out_path):
                LOG.warning(
                    "mergekit-multi step %s: %s holds a model merged from another config; "
                    "merging it again", self.name, self.out_path,
                )
                return original(self.model_copy(update={"lazy": False}), **kwargs)
            return original(self, **kwargs)

        return execute

    _wrap_once(task, "execute", wrap)


def _stale_expo_step(config_yaml: str, out_path: str) -> bool:
    """The step's folder holds a model whose ``mergekit_config.yml`` is not this step's config.

    mergekit-multi calls ``run_merge`` without the config's text; ``after_merge`` then passes
    ``MergeConfiguration.to_yaml()`` of the config as given (mergekit would write it after
    rewriting models into slices). Without a model card there is nothing to compare and
    mergekit's own rule (a config.json and weights mean done) stands.
    """
    import yaml
    from mergekit.config import MergeConfiguration

    from mergekit_expo.merge.validation import uses_expo

    written = os.path.join(out_path, "mergekit_config.yml")
    if not os.path.exists(os.path.join(out_path, "config.json")) or not os.path.exists(written):
        return False
    config = MergeConfiguration.model_validate(yaml.safe_load(config_yaml))
    if not uses_expo(config):
        return False
    with open(written, encoding="utf-8") as handle:
        return handle.read() != config.to_yaml()


def after_multimerge(multimerge: ModuleType) -> None:
    """mergekit-multi: every expo step is checked before the first runs, and a lazy run merges
    again an expo step whose folder holds a model merged from another config."""
    _validate_steps_first(multimerge)
    _rerun_stale_steps(multimerge)


def after_task_adapter(task_adapter: ModuleType) -> None:
    parameters, fields = ("self", "tensors", "_kwargs"), ("method_name", "gather_tensors")
    if not _expect_task(task_adapter, "ExecuteMergeMethodTask", parameters, fields,
                        "after_task_adapter"):
        return

    def wrap(original: Callable) -> Callable:
        def execute(self, tensors, **kwargs):
            if self.method_name != METHOD_NAME:
                return original(self, tensors=tensors, **kwargs)
            from mergekit_expo.merge.guards import rows_reference_lacks_for

            with rows_reference_lacks_for(self.gather_tensors):
                return original(self, tensors=tensors, **kwargs)

        return execute

    _wrap_once(task_adapter.ExecuteMergeMethodTask, "execute", wrap)


def after_architecture(architecture: ModuleType) -> None:
    if not _expect(
        architecture, "get_architecture_info", ("config", "options"), "after_architecture"
    ):
        return

    def wrap(original: Callable) -> Callable:
        def get_architecture_info(config, options):
            if getattr(config, "merge_method", None) == METHOD_NAME:
                from mergekit_expo.merge.guards import forget_rows_reference_lacks
                from mergekit_expo.merge.validation import (
                    config_findings,
                    input_findings,
                    raise_errors,
                )

                forget_rows_reference_lacks()
                raise_errors(config_findings(config))
                raise_errors(input_findings(config, options))
            return original(config, options)

        return get_architecture_info

    function = _wrap_once(architecture, "get_architecture_info", wrap)
    _rebind_in_merge("get_architecture_info", function)


def after_plan(plan: ModuleType) -> None:
    planner = getattr(plan, "MergePlanner", None)
    if planner is None:
        return lose("after_plan", "mergekit's mergekit.plan has no MergePlanner")
    if not _expect(planner, "plan_to_disk", ("self", "out_path"), "after_plan"):
        return

    def wrap(original: Callable) -> Callable:
        def plan_to_disk(self, out_path):
            tasks = original(self, out_path=out_path)
            if getattr(self.config, "merge_method", None) == METHOD_NAME:
                from mergekit.io.tasks import LoaderCache

                from mergekit_expo.merge.forecast import (
                    disk_findings,
                    output_bytes,
                    template_findings,
                )
                from mergekit_expo.merge.validation import (
                    plan_findings,
                    planned_tensors,
                    raise_errors,
                    read_inputs,
                )

                config, planned = self.config, planned_tensors(tasks)
                names = {
                    m: LoaderCache().get(m).index.tensor_paths.keys()
                    for m in config.referenced_models()
                }
                headers, _ = read_inputs(config)  # damaged files were refused before
                _, disk = disk_findings(output_bytes(config, planned, headers)[0], out_path)
                raise_errors(
                    plan_findings(config, planned, names) + disk + template_findings(config)
                )
            return tasks

        return plan_to_disk

    _wrap_once(plan.MergePlanner, "plan_to_disk", wrap)


def _validate_steps_first(multimerge: ModuleType) -> None:
    parameters = (
        "merge_configs", "dependencies", "merge_options", "intermediate_dir", "out_path", "lazy",
    )
    if not _expect(multimerge, "make_tasks", parameters, "validate_multimerge"):
        return

    def wrap(original: Callable) -> Callable:
        def make_tasks(merge_configs, dependencies, merge_options, intermediate_dir, *args):
            from mergekit_expo.merge.validation import (
                config_findings,
                device_findings,
                path_findings,
                raise_errors,
                uses_expo,
            )

            steps = [name for name in merge_configs if name is not None]
            produced = [os.path.join(intermediate_dir, name) for name in steps]
            for name, config in merge_configs.items():
                if uses_expo(config):
                    findings = config_findings(config) + path_findings(config, produced=produced)
                    raise_errors(
                        findings + device_findings(merge_options),
                        context=f"mergekit-multi step {name or '(final, unnamed)'}",
                    )
            return original(merge_configs, dependencies, merge_options, intermediate_dir, *args)

        return make_tasks

    _wrap_once(multimerge, "make_tasks", wrap)


def _rebind_in_merge(name: str, function: Callable) -> None:
    """``mergekit.merge`` imported before us holds the unwrapped function by name."""
    merge = sys.modules.get("mergekit.merge")
    if merge is not None:
        setattr(merge, name, function)


def _wrap_once(owner: Any, name: str, wrap: Callable[[Callable], Callable]) -> Callable:
    """Replace ``owner.name`` by ``wrap(original)``, marked so that a second call keeps it."""
    original = getattr(owner, name)
    if getattr(original, _MARK, False):
        return original
    wrapper = functools.wraps(original)(wrap(original))
    setattr(wrapper, _MARK, True)
    setattr(owner, name, wrapper)
    return wrapper
