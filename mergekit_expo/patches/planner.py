"""``mergekit.plan.MergePlanner.plan_to_disk``: check the planned expo merge (filters, tensors it
would drop, free disk space, chat template: ``check.merge_start.after_plan``) before any tensor
is read."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from mergekit_expo.merge import METHOD_NAME
from mergekit_expo.patches.apply import install_wrapper
from mergekit_expo.patches.record import Call, Internal, every_expo_merge

PLAN_TO_DISK = Internal(
    "mergekit.plan", "MergePlanner.plan_to_disk",
    "planned expo merges are not checked (unmatched filters, dropped tensors, free disk, "
    "chat template)",
    call=Call(("self", "out_path"), forwards=True), needed_by=every_expo_merge,
)
RECORDS = (PLAN_TO_DISK,)


def install(plan: ModuleType) -> None:
    install_wrapper(plan, PLAN_TO_DISK, _checking_the_plan)


def _checking_the_plan(original: Callable) -> Callable:
    def plan_to_disk(self, out_path, *args, **kwargs):
        if getattr(self.config, "merge_method", None) != METHOD_NAME:
            return original(self, out_path, *args, **kwargs)
        from mergekit_expo.check.findings import raise_errors
        from mergekit_expo.check.merge_start import after_plan
        from mergekit_expo.output.staging import destination

        config = self.config.model_copy(deep=True)  # the planner rewrites self.config
        tasks = original(self, out_path, *args, **kwargs)
        # free space is measured, and named, where the output goes (the staging folder is
        # beside it, on the same file system)
        raise_errors(after_plan(config, tasks, destination(out_path))[1])
        return tasks

    return plan_to_disk
