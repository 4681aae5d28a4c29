"""The kernel as it was at an earlier commit, loaded from git, to run beside today's."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).parents[1]
# the last commit before every element was rounded exactly once (issue 20)
BEFORE_EXACT_ROUNDING = "9351e33"


def old_formula(revision: str = BEFORE_EXACT_ROUNDING) -> types.ModuleType:
    """``mergekit_expo.merge.formula`` at ``revision``, as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:mergekit_expo/merge/formula.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    name = f"formula_at_{revision}"
    module = types.ModuleType(name)
    module.__file__ = f"{revision}:mergekit_expo/merge/formula.py"
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102
    return module
