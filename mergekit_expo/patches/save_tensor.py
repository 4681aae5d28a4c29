"""``mergekit.io.tasks``: refuse a non-finite tensor of an expo merge after the ``out_dtype`` cast.

The wrapper learns which method made the tensor from the merge task's ``method_name`` (recorded
in ``task_adapter``, where that task lives).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from mergekit_expo.merge import METHOD_NAME
from mergekit_expo.patches.apply import install_wrapper
from mergekit_expo.patches.record import SUPPORTED, Call, Internal, with_out_dtype

FEATURE = "the out_dtype overflow guard is off"
SAVE_TENSOR = Internal(
    "mergekit.io.tasks", "SaveTensor.execute", FEATURE, needed_by=with_out_dtype,
    call=Call(("self", "writer", "tensor"), forwards=True),
    fields=("dtype", "tensor_task", "tensor_name"),
)
DTYPE_FROM_NAME = Internal("mergekit.common", "dtype_from_name", FEATURE,
                           call=Call(("name",)), needed_by=with_out_dtype)
RECORDS = (SAVE_TENSOR, DTYPE_FROM_NAME)


def install(tasks: ModuleType) -> None:
    install_wrapper(tasks, SAVE_TENSOR, _checked_cast, needs=(DTYPE_FROM_NAME,))


def _checked_cast(original: Callable) -> Callable:
    def execute(self, writer, tensor, *args, **kwargs):
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
        return original(self, writer, tensor, *args, **kwargs)

    return execute


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
