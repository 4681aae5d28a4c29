"""Start-up hook: registers ``expo`` when mergekit is imported, without importing mergekit.

``mergekit_expo.pth`` imports this module at interpreter start-up. mergekit 0.1.5 has no plugin
entry points, so a ``sys.meta_path`` finder waits for the mergekit modules we extend and, right
after each has executed, installs the patch module (``mergekit_expo.patches.*``) that extends
it; a patch that cannot be installed records the feature it loses instead of breaking mergekit's
import (``patches.apply.after_import``). Nothing heavy is imported here:
this runs in every Python process of the environment, so it imports only ``os`` and ``sys``
(already loaded by then). The finder and the loader wrapper are plain classes, not
``importlib.abc`` subclasses: importing ``importlib.abc`` alone costs 15-40 ms (it pulls in
``importlib.resources``, ``pathlib``, ``tempfile``, ``typing``), and the import system needs
only ``find_spec`` on a finder and ``create_module``/``exec_module`` on a loader.
Set ``MERGEKIT_EXPO_DISABLE=1`` to opt out; ``mergekit_expo.register()`` still works.
"""

import os
import sys

OPT_OUT_ENV = "MERGEKIT_EXPO_DISABLE"

# module -> the patch module whose install(module) runs once it has executed
AFTER_IMPORT = {
    "mergekit.merge_methods": "mergekit_expo.patches.registry",
    "mergekit_expo.merge.method": "mergekit_expo.patches.registry",
    "mergekit.card": "mergekit_expo.patches.card",
    "mergekit.tokenizer.embed": "mergekit_expo.patches.vocabulary",
    "mergekit.io.tasks": "mergekit_expo.patches.save_tensor",
    "mergekit.merge": "mergekit_expo.patches.run_merge",
    "mergekit.merge_methods.task_adapter": "mergekit_expo.patches.task_adapter",
    "mergekit.architecture": "mergekit_expo.patches.architecture",
    "mergekit.plan": "mergekit_expo.patches.planner",
    "mergekit.scripts.multimerge": "mergekit_expo.patches.multimerge",
    "mergekit.scripts.run_yaml": "mergekit_expo.patches.run_yaml",
}


class _HookedLoader:
    """Delegates to the real loader, then installs our patch for the executed module."""

    def __init__(self, loader, patch: str):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        from mergekit_expo.patches.apply import after_import

        after_import(self._patch, module, AFTER_IMPORT)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class AfterImportFinder:
    """Finds nothing itself; wraps the loader the other finders return for hooked modules."""

    def find_spec(self, fullname, path, target=None):
        patch = AFTER_IMPORT.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, AfterImportFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _HookedLoader(spec.loader, patch)
        return spec


# The finder on sys.meta_path is process-wide by nature: it must see every import of the process.
def install() -> bool:
    """Put the finder first on ``sys.meta_path`` unless opted out or already there."""
    if os.environ.get(OPT_OUT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    if any(isinstance(finder, AfterImportFinder) for finder in sys.meta_path):
        return True
    sys.meta_path.insert(0, AfterImportFinder())
    return True


install()
