"""dtype names as mergekit reads them, and the one rule for the dtype a tensor is merged in.

mergekit accepts ``bfloat16``, ``float16``, ``float32``, ``float64`` (and ``int64``), with or
without ``torch.``; any other name (``bf16``, ``fp32``) fails deep inside the merge. Without
``dtype:`` each tensor is computed in the common dtype of all its inputs (``torch.promote_types``,
every listed model, used or not); ``out_dtype:`` casts the result. The plan, the checks, the
output-size forecast and the search's candidates all take dtypes from here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from mergekit_expo.errors import ExpoError

NAMES = ("bfloat16", "float16", "float32", "float64", "int64")
FLOATS = ("float16", "bfloat16", "float32", "float64")
ALIASES = {
    "bf16": "bfloat16", "fp16": "float16", "half": "float16", "f16": "float16",
    "fp32": "float32", "float": "float32", "f32": "float32", "single": "float32",
    "fp64": "float64", "double": "float64", "f64": "float64",
}
# torch's itemsize per name, without importing torch (start-up and check stay light)
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}


class DtypeError(ExpoError, ValueError):
    """A dtype name mergekit does not read; the message names the key and the right spelling."""


def dtype_name(value: object, key: str) -> str | None:
    """The canonical name of ``dtype:`` / ``out_dtype:`` as mergekit reads it, or an error."""
    if value is None:
        return None
    text = str(value)
    name = text.removeprefix("torch.")
    if name in NAMES:
        return name
    guess = ALIASES.get(name.lower()) or next(
        iter(difflib.get_close_matches(name.lower(), NAMES, n=1, cutoff=0.6)), None
    )
    hint = f"; did you mean `{key}: {guess}`?" if guess else ""
    raise DtypeError(
        f"`{key}: {text}` is not a dtype mergekit reads{hint} "
        f"(it reads {', '.join(NAMES[:4])})"
    )


def is_float(name: str | None) -> bool:
    return name is not None and (name in FLOATS or name.startswith("float8"))


def promote(names: Iterable[str]) -> str | None:
    """The common dtype of floating inputs (torch's rule), without importing torch."""
    import torch

    found = None
    for name in names:
        if not is_float(name):
            continue
        dtype = getattr(torch, name)
        found = dtype if found is None else torch.promote_types(found, dtype)
    return None if found is None else str(found).removeprefix("torch.")


def working_dtype(config_dtype: str | None, input_dtypes: Iterable[str]) -> str | None:
    """What the kernel computes and rounds to for one tensor: ``dtype:`` or the promotion of
    its inputs; None for a tensor that is not floating point (mergekit copies it)."""
    names = list(input_dtypes)
    if names and not any(is_float(n) for n in names):
        return None
    if config_dtype is not None:
        return config_dtype
    return promote(names)


def output_dtype(out_dtype: str | None, working: str | None, fallback: str) -> str:
    """What is written: ``out_dtype:`` for floating tensors, else the working dtype."""
    if working is None:
        return fallback
    return out_dtype or working
