"""Validated YAML parameters of ``expo``: numbers only, finite, with their documented defaults."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BeforeValidator, Strict

# The parameter names of ``expo``, in one place: the method's spec, the config checks and the
# search all read them from here.
ALPHA, LAMBDA, FINAL, WARN_RELATIVE_CHANGE = "alpha", "lambda", "final", "warn_relative_change"
SHARED = (ALPHA, LAMBDA, WARN_RELATIVE_CHANGE)  # one value per tensor, for all models
PER_MODEL = (FINAL,)  # one value per model

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


def to_number(name: str, value: Any) -> float:
    """``value`` as the kernel reads parameter ``name``; ValueError naming it otherwise."""
    return _finite_number(name)(value)


def number(name: str) -> Any:
    """A float type that accepts ints and numeric strings (YAML's ``1e-1``) and names itself."""
    return Annotated[float, BeforeValidator(_finite_number(name))]


# ``final`` is a YAML boolean: pydantic's lax bool would read ``'yes'``, ``1`` or ``'true'`` as
# true, and every other reader of the config would have to guess the same way.
FinalFlag = Annotated[bool, Strict()]
