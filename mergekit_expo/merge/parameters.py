"""Validated YAML parameters of ``expo``: numbers only, finite, with their documented defaults."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BeforeValidator

DEFAULT_ALPHA = 0.3
DEFAULT_LAMBDA = 0.0
# ‖θᵢ − θ₀‖ / ‖θ₀‖ above this (per weight matrix) means "probably not SFT→aligned relatives".
DEFAULT_WARN_RELATIVE_CHANGE = 0.25


def _finite_number(name: str):
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(
                f"expo parameter {name!r} must be a number, got {value!r} "
                f"({type(value).__name__}); write e.g. `{name}: 0.3`"
            )
        try:
            number = float(value)
        except ValueError:
            raise ValueError(
                f"expo parameter {name!r} must be a number, got the string {value!r}; "
                f"write e.g. `{name}: 0.3`"
            ) from None
        if not math.isfinite(number):
            raise ValueError(f"expo parameter {name!r} must be finite, got {value!r}")
        return number

    return check


def number(name: str) -> Any:
    """A float type that accepts ints and numeric strings (YAML's ``1e-1``) and names itself."""
    return Annotated[float, BeforeValidator(_finite_number(name))]
