"""How ``expo`` joins the unmodified mergekit tools: registration plus three small extensions.

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
- ``mergekit.architecture``: check an expo config and its inputs' headers (``validation``)
  before mergekit reads anything; ``mergekit.plan``: check the planned merge (filters, tensors
  it would drop, free disk space, chat template: ``validation``, ``output``) before any tensor
  is read; ``mergekit.scripts.multimerge``: check every expo
  step of a ``mergekit-multi`` file before the first one runs.
- ``mergekit.merge_methods.task_adapter``: hand the kernel the vocabulary rows recorded for its
  own input task (``guards``), whatever device mergekit copied the tensors to.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from mergekit_expo.merge import METHOD_NAME

LOG = logging.getLogger("mergekit_expo")
_MARK = "__mergekit_expo__"


def run_hook(hook: str, module: ModuleType) -> None:
    """Run one ``after_*`` hook; a failure leaves mergekit usable and says why."""
    try:
        apply(hook, module)
    except Exception as error:  # noqa: BLE001 - never break mergekit's own import
        LOG.warning(
            "mergekit-expo could not extend %s (%s: %s); `merge_method: expo` may be "
            "unavailable or incomplete with this mergekit version (supported: >=0.1.5,<0.2)",
            module.__name__,
            type(error).__name__,
            error,
        )


def apply(hook: str, module: ModuleType) -> None:
    """Run the ``after_*`` function named ``hook`` on ``module``; errors propagate."""
    globals()[hook](module)


def after_merge_methods(merge_methods: ModuleType) -> None:
    method_module = sys.modules.get("mergekit_expo.merge.method")
    if method_module is not None and not hasattr(method_module, "expo_method"):
        return  # merge.method is importing mergekit right now: after_method registers it
    from mergekit_expo.merge.method import expo_method

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

    def wrap(original: Callable) -> Callable:
        def generate_card(config, config_yaml, name=None):
            text = original(config=config, config_yaml=config_yaml, name=name)
            return add_roles_section(text, config)

        return generate_card

    _rebind_in_merge("generate_card", _wrap_once(card, "generate_card", wrap))


def after_embed(embed: ModuleType) -> None:
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
    def wrap(original: Callable) -> Callable:
        def execute(self, writer, tensor):
            if (
                tensor is not None
                and self.dtype
                and tensor.is_floating_point()
                and getattr(self.tensor_task, "method_name", None) == METHOD_NAME
            ):
                import torch
                from mergekit.common import dtype_from_name

                from mergekit_expo.merge.guards import NonFiniteError, overflow_message

                tensor = tensor.to(dtype=dtype_from_name(self.dtype))
                if not bool(torch.isfinite(tensor).all()):
                    raise NonFiniteError(overflow_message(self.tensor_name, tensor.dtype))
            return original(self, writer=writer, tensor=tensor)

        return execute

    _wrap_once(tasks.SaveTensor, "execute", wrap)


def after_task_adapter(task_adapter: ModuleType) -> None:
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
    def wrap(original: Callable) -> Callable:
        def plan_to_disk(self, out_path):
            tasks = original(self, out_path=out_path)
            if getattr(self.config, "merge_method", None) == METHOD_NAME:
                from mergekit.io.tasks import LoaderCache

                from mergekit_expo.merge.output import (
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


def after_multimerge(multimerge: ModuleType) -> None:
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
