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
- ``mergekit.merge``: an expo merge writes into a staging folder and moves into place only when
  complete (``merge.output``).
"""

from __future__ import annotations

import functools
import importlib
import logging
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

    generate_card = _wrap_once(card, "generate_card", wrap)
    merge = sys.modules.get("mergekit.merge")
    if merge is not None:  # imported before us: it holds the unwrapped function by name
        merge.generate_card = generate_card


def after_embed(embed: ModuleType) -> None:
    def wrap(original: Callable) -> Callable:
        def execute(self, tokenizer_info, tensors):
            from mergekit_expo.merge.guards import record_rows_reference_lacks

            result = original(self, tokenizer_info=tokenizer_info, tensors=tensors)
            base = self.base_model
            if base is not None and base in result and base in tokenizer_info.permutations:
                record_rows_reference_lacks(
                    result[base],
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


def after_merge(merge: ModuleType) -> None:
    def wrap(original: Callable) -> Callable:
        def run_merge(merge_config, out_path, options, config_source=None):
            if not uses_expo(merge_config):
                return original(merge_config, out_path, options=options,
                                config_source=config_source)
            from mergekit_expo.merge.output import staged

            with staged(out_path) as staging:
                return original(merge_config, staging, options=options,
                                config_source=config_source)

        return run_merge

    run_merge = _wrap_once(merge, "run_merge", wrap)
    for name in ("mergekit.scripts.run_yaml", "mergekit.scripts.multimerge"):
        holder = sys.modules.get(name)  # imported before us: holds the unwrapped function
        if holder is not None and hasattr(holder, "run_merge"):
            holder.run_merge = run_merge


def uses_expo(merge_config: Any) -> bool:
    """Whether ``merge_method: expo`` appears anywhere in the config (top, slices, modules)."""

    def found(value: Any) -> bool:
        if isinstance(value, dict):
            return value.get("merge_method") == METHOD_NAME or any(map(found, value.values()))
        if isinstance(value, (list, tuple)):
            return any(map(found, value))
        return False

    return found(merge_config.model_dump())


def _wrap_once(owner: Any, name: str, wrap: Callable[[Callable], Callable]) -> Callable:
    """Replace ``owner.name`` by ``wrap(original)``, marked so that a second call keeps it."""
    original = getattr(owner, name)
    if getattr(original, _MARK, False):
        return original
    wrapper = functools.wraps(original)(wrap(original))
    setattr(wrapper, _MARK, True)
    setattr(owner, name, wrapper)
    return wrapper
