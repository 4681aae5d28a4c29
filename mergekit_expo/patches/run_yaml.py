"""``mergekit.scripts.run_yaml.main``: under ``mergekit-yaml``, a refusal of mergekit-expo prints
as one block (what is wrong, where, what to change) and exits with status 1; the traceback only
with ``-v``. The same wrapper serves ``mergekit-multi`` (``patches.multimerge``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType

from mergekit_expo.patches.apply import install_wrapper
from mergekit_expo.patches.record import Call, Internal

MAIN = Internal(
    "mergekit.scripts.run_yaml", "main.callback",
    "mergekit-yaml prints mergekit-expo's refusals as tracebacks",
    call=Call(forwards=True),
)
RECORDS = (MAIN,)


def install(run_yaml: ModuleType) -> None:
    install_wrapper(run_yaml, MAIN, one_block("mergekit-yaml"))


def one_block(command: str) -> Callable[[Callable], Callable]:
    """A wrapper of a mergekit command's click callback that prints our refusals as one block."""

    def wrap(original: Callable) -> Callable:
        def callback(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - ours are printed, others re-raised
                refusal = expo_refusal(error)
                if refusal is None or kwargs.get("verbosity", 0) > 0:
                    raise
                print(f"{command}: refused by mergekit-expo\n{refusal}\n"
                      "(run with -v for the traceback)", file=sys.stderr)
                sys.exit(1)

        return callback

    return wrap


def expo_refusal(error: BaseException) -> str | None:
    """The message of the first ExpoError in ``error``'s chain (mergekit may wrap ours)."""
    from mergekit_expo.errors import ExpoError

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ExpoError):
            return str(error)
        error = error.__cause__ or error.__context__
    return None
