"""Model extrapolation (ExPO) and the iterative-DPO (λ, α) merge for mergekit.

The merge method lives in ``mergekit_expo.merge``, the α/λ search in ``mergekit_expo.search``,
the demo and its tiny checkpoints in ``mergekit_expo.demo``; here are only the public API, the
command line (``cli``) and the start-up hook (``_startup``). See docs/layout.md.

Importing this package is cheap on purpose: it runs at every interpreter start-up (through
``mergekit_expo.pth``), so torch and mergekit are imported only when mergekit itself is.
"""

from mergekit_expo.merge import METHOD_NAME

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)


def register() -> None:
    """Make ``merge_method: expo`` available to mergekit in this process (idempotent).

    Needed only where the automatic hook is off (``MERGEKIT_EXPO_DISABLE=1``, ``python -S``) or
    mergekit was imported before this package was installed. It installs the patches of the
    start-up hook's table (``_startup.AFTER_IMPORT``) for the modules now (errors propagate);
    importing ``_startup`` also installs its finder unless opted out, so later imports are
    extended too.
    """
    import importlib

    from mergekit_expo._startup import AFTER_IMPORT

    for module_name, patch in AFTER_IMPORT.items():
        importlib.import_module(patch).install(importlib.import_module(module_name))


__all__ = ["METHOD_NAME", "__version__", "register"]
