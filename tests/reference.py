"""An independent float64 reference of the two formulas, straight from the papers' algebra."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file


def load(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint, sharded or not."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors.update(load_file(model_dir / shard))
        return tensors
    return load_file(model_dir / "model.safetensors")


def formula64(
    reference: torch.Tensor,
    final: torch.Tensor,
    intermediates: Sequence[torch.Tensor] = (),
    *,
    alpha: float,
    lam: float = 0.0,
) -> torch.Tensor:
    """θ = −αθ₀ + (1+α)λθ̄ + (1+α)(1−λ)θ_T in float64 (λ = 0: θ₁ + α(θ₁ − θ₀))."""
    theta0, theta_t = reference.double(), final.double()
    if not lam:
        return theta_t + alpha * (theta_t - theta0)
    mean = torch.stack([t.double() for t in intermediates]).mean(0)
    return -alpha * theta0 + (1 + alpha) * lam * mean + (1 + alpha) * (1 - lam) * theta_t


def agreement(actual: torch.Tensor, expected64: torch.Tensor) -> float:
    """Share of elements equal to the float64 value rounded to the actual dtype."""
    assert actual.shape == expected64.shape
    return float((actual == expected64.to(actual.dtype)).double().mean())
