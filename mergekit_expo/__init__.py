"""Model extrapolation (ExPO) and the iterative-DPO (λ, α) merge for mergekit.

Importing this package is cheap on purpose: it runs at every interpreter start-up (through
``mergekit_expo.pth``), so torch and mergekit are imported only when mergekit itself is.
"""

from __future__ import annotations

__version__ = "0.1.0"

METHOD_NAME = "expo"


def register() -> None:
    """Make ``merge_method: expo`` available to mergekit in this process (idempotent).

    Needed only where the automatic hook is off (``MERGEKIT_EXPO_DISABLE=1``, ``python -S``) or
    mergekit was imported before this package was installed.
    """
    from mergekit_expo.registration import register as _register

    _register()


__all__ = ["METHOD_NAME", "__version__", "register"]
