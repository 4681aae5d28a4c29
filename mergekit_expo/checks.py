"""Guards around the formula: refuse non-finite tensors, warn on unrelated checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mergekit_expo.roles import Roles

LOG = logging.getLogger("mergekit_expo")

# Elements sampled per weight matrix (whole, evenly spaced rows) for the relatedness figure:
# enough to tell a DPO-sized move (~1e-3..5e-2) from an unrelated model (~1.4) at a cost that
# does not grow with the matrix (256 rows were ~10 % of all weights, read for every tensor).
SAMPLE_ELEMENTS = 1 << 16


class NonFiniteError(ValueError):
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
