"""Guards around the formula: what the kernel refuses, warns about, or must not extrapolate.

- Non-finite inputs or results (inf/NaN, an overflow of the output dtype) are refused, naming
  the tensor and the culprit.
- A checkpoint that moved too far from θ₀ to be its aligned descendant gets a warning: ExPO
  between unrelated models collapses the model.
- Vocabulary rows θ₀ lacks keep θ_T's own row. With ``tokenizer: {source: union}``, mergekit
  invents θ₀'s row for a token θ₀ does not have (a copy of the one model that has it, or the
  mean of several); extrapolating θ_T against an invented row is meaningless. mergekit does not
  tell a merge method which rows were invented, so ``patches.vocabulary`` wraps its
  ``PermutedVocabulary`` task to record them here, keyed by that task, and
  ``patches.task_adapter`` wraps its merge task to pass them to the kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch

from mergekit_expo.errors import ExpoError

if TYPE_CHECKING:
    from mergekit_expo.merge.roles import Roles

LOG = logging.getLogger("mergekit_expo")

# Elements sampled per weight matrix (whole, evenly spaced rows) for the relatedness figure:
# enough to tell a DPO-sized move (~1e-3..5e-2) from an unrelated model (~1.4) at a cost that
# does not grow with the matrix.
SAMPLE_ELEMENTS = 1 << 16


class NonFiniteError(ExpoError, ValueError):
    """A tensor (input or result) holds inf or NaN; nothing usable can be written."""


def check_finite(result: torch.Tensor, roles: Roles, *, alpha: float, lam: float) -> None:
    """Raise, naming the tensor and the culprit, if the result is not finite."""
    if bool(torch.isfinite(result).all()):
        return
    name = roles.tensor_name
    entries = (roles.reference, roles.final, *(roles.intermediates if lam else ()))
    for entry in entries:
        bad = int((~torch.isfinite(entry.tensor)).sum())
        if bad:
            raise NonFiniteError(
                f"expo: input tensor {name} of model {entry.id} has {bad} non-finite "
                "(inf/NaN) values. The checkpoint is damaged or was saved in a dtype too "
                "narrow for it; fix or re-export that model before merging."
            )
    raise NonFiniteError(overflow_message(name, result.dtype, alpha, lam))


def overflow_message(
    name: str, dtype: torch.dtype, alpha: float | None = None, lam: float | None = None
) -> str:
    limit = torch.finfo(dtype).max
    at = f" at alpha = {alpha:g}, lambda = {lam:g}" if alpha is not None else ""
    return (
        f"expo: the result for tensor {name} overflows {dtype} (|value| > {limit:.4g}){at}. "
        "Nothing complete was written. Use a smaller alpha (for this tensor with a filter if "
        "needed), or write a wider dtype (out_dtype: bfloat16 or float32)."
    )


# (reference, model) pairs already warned about. Process-wide because mergekit calls the kernel
# once per tensor and hands it no per-merge object: without it the warning would repeat for every
# tensor of the model.
_warned: set[Hashable] = set()


def relative_change(model: torch.Tensor, reference: torch.Tensor) -> float | None:
    """‖θᵢ − θ₀‖ / ‖θ₀‖ on evenly spaced rows of a weight matrix; None where undefined."""
    if model.ndim < 2 or model.shape[0] == 0:
        return None
    rows = max(1, min(model.shape[0], SAMPLE_ELEMENTS // max(1, model[0].numel())))
    step = max(1, model.shape[0] // rows)
    sample_ref = reference[::step][:rows].to(torch.float32)
    ref_norm = torch.linalg.vector_norm(sample_ref)
    if not bool(torch.isfinite(ref_norm)) or float(ref_norm) == 0.0:
        return None
    delta = model[::step][:rows].to(torch.float32) - sample_ref
    return float(torch.linalg.vector_norm(delta) / ref_norm)


def warn_if_unrelated(roles: Roles, threshold: float) -> None:
    """Warn once per model whose weights moved too far from θ₀ to be its aligned descendant."""
    for entry in (roles.final, *roles.intermediates):
        key = (roles.reference.id, entry.id)
        if key in _warned:
            continue
        change = relative_change(entry.tensor, roles.reference.tensor)
        if change is not None and change > threshold:
            _warned.add(key)
            LOG.warning(
                "expo: model %s differs from the reference %s by %.3g of its norm in %s "
                "(warning threshold %g). SFT→DPO moves are typically below 0.05; this pair "
                "is probably not an SFT→aligned pair, and extrapolating between unrelated "
                "checkpoints collapses the model. Check base_model, or raise "
                "warn_relative_change if this is intended.",
                entry.id,
                roles.reference.id,
                change,
                roles.tensor_name,
                threshold,
            )


# mergekit's vocabulary task (PermutedVocabulary) -> the output-vocabulary ids whose reference
# row it invented. Keyed by the task, not by the tensor: mergekit copies tensors to the math
# device (--cuda, --device) between the tasks, so a tensor's identity does not survive. The
# merge task of the same tensor names this task as its input; ``patches.task_adapter`` looks
# the rows up there and hands them to the kernel through ``_current`` for the duration of that
# one call.
# Process-wide because it is the only channel from the tokenizer task, which invents the rows, to
# the kernel, which runs later as another task; emptied at the start of every expo merge.
_lacking: dict[Hashable, torch.Tensor] = {}
_current: ContextVar[torch.Tensor | None] = ContextVar("expo_rows_reference_lacks", default=None)


def record_rows_reference_lacks(
    task: Hashable, permutation: dict[int, int], vocab_ids: list[int]
) -> None:
    """Remember the output-vocabulary ids whose reference row mergekit invented in ``task``."""
    rows = [token_id for token_id in vocab_ids if permutation.get(token_id, -1) < 0]
    if rows:
        _lacking[task] = torch.tensor(sorted(rows))
    else:
        _lacking.pop(task, None)


@contextmanager
def rows_reference_lacks_for(input_task: Hashable) -> Iterator[None]:
    """Make the rows recorded for ``input_task`` visible to the kernel within this block."""
    token = _current.set(_lacking.get(input_task))
    try:
        yield
    finally:
        _current.reset(token)


def forget_rows_reference_lacks() -> None:
    _lacking.clear()


def keep_rows_reference_lacks(
    result: torch.Tensor, roles: Roles, vocabulary_axis: int | None
) -> bool:
    """Copy θ_T's rows into ``result`` wherever θ₀'s row was invented; True if it did."""
    if vocabulary_axis is None:
        return False
    rows = _current.get()
    if rows is None:
        return False
    rows = rows.to(result.device)
    final_rows = roles.final.tensor.index_select(vocabulary_axis, rows)
    result.index_copy_(vocabulary_axis, rows, final_rows.to(result.dtype))
    return True
