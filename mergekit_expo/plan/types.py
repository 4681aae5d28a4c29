"""The plan of an expo merge: immutable, built once (``build``), read by every surface."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mergekit_expo.plan.dtypes import ITEMSIZE


@dataclass(frozen=True)
class SlicePlan:
    """Roles and settings of one output slice (``all layers`` for a ``models:`` config)."""

    where: str
    reference: Any  # ModelReference θ₀
    final: Any  # ModelReference θ_T
    intermediates: tuple[Any, ...]  # averaged into θ̄
    alpha: Any  # the setting as written: a number, a gradient or a filter list
    lam: Any
    warn_relative_change: Any  # the relatedness threshold's setting


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor as mergekit plans it, with what mergekit resolved for it."""

    name: str  # as written to the output
    reference: Any
    final: Any
    intermediates: tuple[Any, ...]
    alpha: float
    lam: float
    inputs: Mapping[Any, str]  # ModelReference -> its tensor name in that checkpoint
    reads: Mapping[Any, tuple[str, ...]]  # every name mergekit may read it under (aliases, tied)
    optional: bool  # mergekit skips it when no input has it
    vocabulary_aligned: bool  # mergekit aligns its vocabulary rows (``tokenizer:``) first
    shapes: Mapping[Any, tuple[int, ...]]  # per input with a local header
    input_dtypes: Mapping[Any, str]  # per input with a local header, as stored
    working_dtype: str | None  # the kernel computes and rounds to this; None: copied from θ_T
    output_dtype: str | None  # what is written; None where no header gives the inputs' dtype
    shape: tuple[int, ...] | None  # None where no local header has the tensor

    @property
    def nbytes(self) -> int | None:
        if self.shape is None or self.output_dtype is None:
            return None
        count = 1
        for size in self.shape:
            count *= size
        return count * ITEMSIZE.get(self.output_dtype, 4)


@dataclass(frozen=True)
class Plan:
    """What an expo merge of ``config`` will do. ``tensors`` is empty for a config-level plan
    (``plan_config``), which needs no model files."""

    config: Any  # a copy of the config as given (not the planner's rewritten one); read only
    dtype: str | None  # ``dtype:`` (validated)
    out_dtype: str | None  # ``out_dtype:`` (validated)
    slices: tuple[SlicePlan, ...]
    tensors: tuple[TensorPlan, ...] = ()
    headers: Mapping[Any, Mapping[str, Any]] = field(default_factory=dict)
    # per input with headers: checkpoint tensor name -> the name mergekit plans with (None: a
    # name transformers fuses away); transformers' renames of older layouts, looked up once, and
    # only for an input some of whose names the plan does not read as they are
    planned_names: Mapping[Any, Mapping[str, str | None]] = field(default_factory=dict)

    @property
    def models(self) -> tuple[Any, ...]:
        """Every input, θ₀ first, each once."""
        found: dict[Any, None] = {}
        for piece in self.slices:
            found.setdefault(piece.reference)
            for model in (*piece.intermediates, piece.final):
                found.setdefault(model)
        return tuple(found)

    def output_bytes(self) -> tuple[int, int]:
        """Bytes of the planned output, and how many planned tensors no local header has."""
        total = unknown = 0
        for tensor in self.tensors:
            size = tensor.nbytes
            if size is None:
                unknown += 1
            else:
                total += size
        return total, unknown
