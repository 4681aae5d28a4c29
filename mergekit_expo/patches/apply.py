"""Installing the patches: after a hooked module has executed, and the wrapping they share.

``mergekit_expo._startup.AFTER_IMPORT`` maps each hooked module to the patch module that
installs for it; each patch module has ``RECORDS`` (see ``record``) and ``install(module)``,
idempotent. At hook time mergekit may still be half-imported, so the wrappers import our
modules (and mergekit's) when they run, not when they are installed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from mergekit_expo.patches.record import MARK, Internal, check, every_expo_merge, lose


def after_import(patch: str, module: ModuleType, table: dict[str, str]) -> None:
    """Install ``patch`` for ``module``; a failure leaves mergekit usable and says what is lost.

    With the registry (imported by every merge), the other modules of the start-up hook's
    ``table`` are looked up too, so that one that moved is named rather than silently missed.
    """
    try:
        importlib.import_module(patch).install(module)
        if module.__name__ == "mergekit.merge_methods":
            check_hooked_modules(table)
    except Exception as error:  # noqa: BLE001 - never break mergekit's own import
        lose_patch(patch, module.__name__,
                   f"extending {module.__name__} failed ({type(error).__name__}: {error})")


def lose_patch(patch: str, module: str, why: str) -> None:
    """Every feature of the patch module ``patch`` is lost (it could not be installed)."""
    try:
        records = importlib.import_module(patch).RECORDS
    except Exception:  # noqa: BLE001 - the patch module itself is broken: refuse every merge
        records = (Internal(module, "*", f"everything {patch} adds is off",
                            needed_by=every_expo_merge),)
    for record in records:
        lose(record, why)


def check_hooked_modules(table: dict[str, str]) -> None:
    """Each mergekit module of ``table`` can be found; one that moved loses its patch's features.

    Looks the files up without importing them (mergekit may be half-imported right now).
    """
    for name, patch in table.items():
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
                lose_patch(patch, name, f"mergekit has no module {name}")
                break
            path = spec.submodule_search_locations


def install_wrapper(module: ModuleType, record: Internal, wrap: Callable[[Callable], Callable],
                    *, needs: tuple[Internal, ...] = ()) -> Callable | None:
    """Replace ``record``'s internal in ``module`` by ``wrap(original)`` if it, and the records
    its wrapper also ``needs``, still fit (each loss is recorded); the wrapper, or None."""
    if not all([check(r, module) is not None for r in (record, *needs)]):
        return None
    owner, _, name = record.name.rpartition(".")
    return wrap_once(getattr(module, owner) if owner else module, name, wrap)


def wrap_once(owner: Any, name: str, wrap: Callable[[Callable], Callable]) -> Callable:
    """Replace ``owner.name`` by ``wrap(original)``, marked so that a second call keeps it."""
    original = getattr(owner, name)
    if getattr(original, MARK, False):
        return original
    wrapper = functools.wraps(original)(wrap(original))
    setattr(wrapper, MARK, True)
    setattr(owner, name, wrapper)
    return wrapper


def rebind_in_merge(name: str, function: Callable) -> None:
    """``mergekit.merge`` imported before us holds the unwrapped function by name."""
    merge = sys.modules.get("mergekit.merge")
    if merge is not None:
        setattr(merge, name, function)

