"""``mergekit.architecture.get_architecture_info``: check an expo config and its inputs' headers
(``check.merge_start.before_read``) before mergekit reads anything."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from mergekit_expo.merge import METHOD_NAME
from mergekit_expo.patches.apply import install_wrapper, rebind_in_merge
from mergekit_expo.patches.record import Call, Internal, every_expo_merge

GET_ARCHITECTURE_INFO = Internal(
    "mergekit.architecture", "get_architecture_info",
    "expo configs and inputs are not checked before the merge reads them",
    call=Call(("config", "options"), forwards=True),
    needed_by=every_expo_merge,  # without the config checks a typo would pass silently
)
RECORDS = (GET_ARCHITECTURE_INFO,)


def install(architecture: ModuleType) -> None:
    function = install_wrapper(architecture, GET_ARCHITECTURE_INFO, _checking_first)
    if function is not None:
        rebind_in_merge("get_architecture_info", function)


def _checking_first(original: Callable) -> Callable:
    def get_architecture_info(config, options, *args, **kwargs):
        if getattr(config, "merge_method", None) == METHOD_NAME:
            from mergekit_expo.check.findings import raise_errors
            from mergekit_expo.check.merge_start import before_read
            from mergekit_expo.merge.guards import forget_rows_reference_lacks

            forget_rows_reference_lacks()
            raise_errors(before_read(config, options))
        return original(config, options, *args, **kwargs)

    return get_architecture_info
