"""How ``expo`` joins the unmodified mergekit tools: registration plus three small extensions.

Each ``after_*`` function runs right after the mergekit module it names has executed (see
``_startup``), or from ``register()`` for explicit use. All are idempotent. Only
``after_merge_methods`` imports our torch/mergekit modules at hook time; the others import them
inside their wrappers, because mergekit may still be half-imported when they run.

- ``mergekit.merge_methods``: register the method by name.
- ``mergekit.card``: add a section naming θ₀, θ_T, the intermediates, α and λ to the card.
- ``mergekit.tokenizer.embed``: remember vocabulary rows the reference lacks (``vocabulary``).
- ``mergekit.io.tasks``: refuse a non-finite tensor after the ``out_dtype`` cast.
"""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from types import ModuleType

from mergekit_expo import METHOD_NAME

LOG = logging.getLogger("mergekit_expo")
_MARK = "__mergekit_expo__"


def run_hook(hook: str, module: ModuleType) -> None:
    """Run one ``after_*`` hook; a failure leaves mergekit usable and says why."""
    try:
        globals()[hook](module)
    except Exception as error:  # noqa: BLE001 - never break mergekit's own import
        LOG.warning(
            "mergekit-expo could not extend %s (%s: %s); `merge_method: expo` may be "
            "unavailable or incomplete with this mergekit version (supported: >=0.1.5,<0.2)",
            module.__name__,
            type(error).__name__,
            error,
        )


def after_merge_methods(merge_methods: ModuleType) -> None:
    method_module = sys.modules.get("mergekit_expo.method")
    if method_module is not None and not hasattr(method_module, "expo_method"):
        return  # mergekit_expo.method is importing mergekit right now; it registers at its end
    from mergekit_expo.method import expo_method

    names = {method.spec.name: method for method in merge_methods.registered_methods()}
    existing = names.get(METHOD_NAME)
    if existing is None:
        merge_methods.register(expo_method)
    elif not isinstance(existing, type(expo_method)):
        raise RuntimeError(
            f"another merge method is already registered as {METHOD_NAME!r}: {existing!r}"
        )


def after_card(card: ModuleType) -> None:
    if getattr(card.generate_card, _MARK, False):
        return
    from mergekit_expo.card import add_roles_section

    original = card.generate_card

    @functools.wraps(original)
    def generate_card(config, config_yaml, name=None):
        text = original(config=config, config_yaml=config_yaml, name=name)
        return add_roles_section(text, config)

    setattr(generate_card, _MARK, True)
    card.generate_card = generate_card
    merge = sys.modules.get("mergekit.merge")
    if merge is not None:  # imported before us: it holds the unwrapped function by name
        merge.generate_card = generate_card


def after_embed(embed: ModuleType) -> None:
    task = embed.PermutedVocabulary
    if getattr(task.execute, _MARK, False):
        return
    original = task.execute

    @functools.wraps(original)
    def execute(self, tokenizer_info, tensors):
        from mergekit_expo.vocabulary import record_rows_reference_lacks

        result = original(self, tokenizer_info=tokenizer_info, tensors=tensors)
        base = self.base_model
        if base is not None and base in result and base in tokenizer_info.permutations:
            record_rows_reference_lacks(
                result[base],
                tokenizer_info.permutations[base],
                list(tokenizer_info.tokenizer.get_vocab().values()),
            )
        return result

    setattr(execute, _MARK, True)
    task.execute = execute


def after_io_tasks(tasks: ModuleType) -> None:
    task = tasks.SaveTensor
    if getattr(task.execute, _MARK, False):
        return
    original = task.execute

    @functools.wraps(original)
    def execute(self, writer, tensor):
        if (
            tensor is not None
            and self.dtype
            and tensor.is_floating_point()
            and getattr(self.tensor_task, "method_name", None) == METHOD_NAME
        ):
            import torch
            from mergekit.common import dtype_from_name

            from mergekit_expo.checks import NonFiniteError, overflow_message

            tensor = tensor.to(dtype=dtype_from_name(self.dtype))
            if not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(overflow_message(self.tensor_name, tensor.dtype))
        return original(self, writer=writer, tensor=tensor)

    setattr(execute, _MARK, True)
    task.execute = execute


def register() -> None:
    """Explicit registration: apply every hook to the mergekit modules now (idempotent)."""
    for module_name, hook in _hooks().items():
        module = importlib.import_module(module_name)
        globals()[hook](module)


def _hooks() -> dict[str, str]:
    from mergekit_expo._startup import AFTER_IMPORT

    return AFTER_IMPORT
