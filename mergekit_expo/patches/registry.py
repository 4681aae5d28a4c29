"""``mergekit.merge_methods``: register ``expo`` by name.

Installed for ``mergekit.merge_methods`` and for ``mergekit_expo.merge.method``: when our method
module is imported first, mergekit could not register it yet.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from mergekit_expo.merge import METHOD_NAME
from mergekit_expo.patches.record import Call, Internal, check

FEATURE = "`merge_method: expo` is not registered"
REGISTER = Internal("mergekit.merge_methods", "register", FEATURE, call=Call(("method",)))
REGISTERED_METHODS = Internal("mergekit.merge_methods", "registered_methods", FEATURE, call=Call())
RECORDS = (REGISTER, REGISTERED_METHODS)


def install(module: ModuleType) -> None:
    if module.__name__ == "mergekit_expo.merge.method":
        module = importlib.import_module("mergekit.merge_methods")
    method_module = sys.modules.get("mergekit_expo.merge.method")
    if method_module is not None and not hasattr(method_module, "expo_method"):
        return  # merge.method is importing mergekit right now: its own hook registers it
    from mergekit_expo.merge.method import expo_method

    if not all([check(record, module) for record in RECORDS]):
        return
    names = {method.spec.name: method for method in module.registered_methods()}
    existing = names.get(METHOD_NAME)
    if existing is None:
        module.register(expo_method)
    elif not isinstance(existing, type(expo_method)):
        raise RuntimeError(
            f"another merge method is already registered as {METHOD_NAME!r}: {existing!r}"
        )
