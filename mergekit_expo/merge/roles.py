"""Who is who in an ``expo`` merge: θ₀ (reference), θ_T (final) and the intermediates.

The rule, in one place for the kernel (per tensor) and the plan (``mergekit_expo.plan``, which
the model card, ``check`` and the search read): ``base_model`` is θ₀; the model with
``final: true`` is θ_T, else the last model listed; every other listed model is an
intermediate, averaged into θ̄.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing mergekit here would start its import (and our hook) too early
    from mergekit.merge_methods.base import PerInputValues, TensorEntry, TensorGroup

LOG = logging.getLogger("mergekit_expo")


@dataclass(frozen=True)
class Roles:
    reference: TensorEntry
    final: TensorEntry
    intermediates: tuple[TensorEntry, ...]
    tensor_name: str


def require_reference(
    input_ids: Sequence[Hashable], base_id: Hashable | None, where: str | None
) -> None:
    """Refuse a merge without θ₀ before anything is computed."""
    if base_id is None or base_id not in input_ids:
        place = f" (in {where})" if where else ""
        raise ValueError(
            f"expo needs a reference model θ₀{place}: set `base_model:` to the SFT checkpoint "
            "the aligned model was trained from (or the iterative-DPO reference). "
            f"Models given: {[str(i) for i in input_ids]}"
        )
    if len(input_ids) < 2:
        raise ValueError(
            f"expo needs at least one model besides base_model {base_id}: list the aligned "
            "(final) checkpoint under `models:`"
        )


def pick_final(non_base: Sequence[Hashable], marked: Sequence[Hashable]) -> Hashable:
    """The single model marked ``final: true``, else the last one listed."""
    if len(marked) > 1:
        raise ValueError(
            f"expo: more than one model has `final: true` ({[str(m) for m in marked]}); "
            "mark exactly one, or none to use the last model listed"
        )
    return marked[0] if marked else non_base[-1]


def tensor_roles(group: TensorGroup, final: PerInputValues[bool], lam: float) -> Roles:
    name = group.metadata.name or "<unnamed tensor>"
    if group.base is None:
        require_reference([entry.id for entry in group.entries], None, name)
    non_base = group.non_base
    final_id = pick_final([e.id for e in non_base], [e.id for e in non_base if final.get(e.id)])
    roles = Roles(
        reference=group.base,
        final=next(e for e in non_base if e.id == final_id),
        intermediates=tuple(e for e in non_base if e.id != final_id),
        tensor_name=name,
    )
    if lam and not roles.intermediates:
        raise ValueError(
            f"expo: lambda = {lam:g} for tensor {name}, but no intermediate checkpoint is "
            f"listed (only the final model {roles.final.id}). Either list the intermediate "
            "iterative-DPO checkpoints (or one averaged model) before the final one, or set "
            "lambda: 0 for plain ExPO."
        )
    return roles


# Role assignments and (α, λ) already logged. Process-wide because mergekit calls the kernel once
# per tensor and hands it no per-merge object: without it every tensor would log them again.
_announced: set[tuple] = set()


def reset_announcements() -> None:
    """Forget what was logged, so the next merge in this process logs its roles again."""
    _announced.clear()


def announce(roles: Roles, *, alpha: float, lam: float) -> None:
    """Log each role assignment and each distinct (α, λ) once per process."""
    key = (roles.reference.id, roles.final.id, tuple(e.id for e in roles.intermediates))
    if key not in _announced:
        _announced.add(key)
        LOG.info(
            "expo roles: reference θ₀ = %s; final θ_T = %s; intermediates (θ̄) = %s",
            roles.reference.id,
            roles.final.id,
            [str(e.id) for e in roles.intermediates] or "none",
        )
        if roles.intermediates and not lam:
            LOG.warning(
                "expo: lambda is 0 for %s, so the intermediate checkpoints %s are ignored "
                "(plain ExPO on %s); set lambda (e.g. 0.3) to use them",
                roles.tensor_name,
                [str(e.id) for e in roles.intermediates],
                roles.final.id,
            )
    values = (key, alpha, lam)
    if values not in _announced:
        _announced.add(values)
        LOG.info("expo: alpha = %g, lambda = %g (first used for %s)", alpha, lam, roles.tensor_name)
