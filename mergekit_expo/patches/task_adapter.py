"""``mergekit.merge_methods.task_adapter``: the merge task of every tensor.

Its ``execute`` hands the kernel the vocabulary rows recorded for its own input task
(``merge.guards``), whatever device mergekit copied the tensors to. Its ``method_name`` tells
the ``save_tensor`` wrapper which method made a tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from mergekit_expo.merge import METHOD_NAME
from mergekit_expo.patches import save_tensor, vocabulary
from mergekit_expo.patches.apply import install_wrapper
from mergekit_expo.patches.record import Call, Internal, check, with_out_dtype, with_tokenizer

EXECUTE = Internal(
    "mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask.execute", vocabulary.FEATURE,
    call=Call(("self", "tensors"), forwards=True), fields=("method_name", "gather_tensors"),
    needed_by=with_tokenizer)
METHOD_NAME_FIELD = Internal(  # read by the save_tensor wrapper
    "mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask", save_tensor.FEATURE,
    fields=("method_name",), needed_by=with_out_dtype,
)
RECORDS = (EXECUTE, METHOD_NAME_FIELD)


def install(task_adapter: ModuleType) -> None:
    check(METHOD_NAME_FIELD, task_adapter)
    install_wrapper(task_adapter, EXECUTE, _handing_rows_over)


def _handing_rows_over(original: Callable) -> Callable:
    def execute(self, tensors, *args, **kwargs):
        if self.method_name != METHOD_NAME:
            return original(self, tensors, *args, **kwargs)
        from mergekit_expo.merge.guards import rows_reference_lacks_for

        with rows_reference_lacks_for(self.gather_tensors):
            return original(self, tensors, *args, **kwargs)

    return execute
