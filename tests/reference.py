"""An independent float64 reference of the two formulas, straight from the papers' algebra."""

from __future__ import annotations

import json
from collections.abc import Sequence
from fractions import Fraction
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


# -- exact: fractions and an own round-half-to-even into each format's bit layout ---------------

# precision (with the implicit bit), exponent bits, width, the signed integer view of the same width
FORMATS = {
    torch.bfloat16: (8, 8, 16, torch.int16),
    torch.float16: (11, 5, 16, torch.int16),
    torch.float32: (24, 8, 32, torch.int32),
}


def exact_formula(theta0, final, intermediates=(), *, alpha: str, lam: str = "0") -> Fraction:
    """θ = −αθ₀ + (1+α)λθ̄ + (1+α)(1−λ)θ_T with α, λ the decimals written (Python floats in)."""
    a, b = Fraction(alpha), Fraction(lam)
    theta_t = Fraction(final)
    mean = (sum(map(Fraction, intermediates), Fraction(0)) / len(intermediates)
            if b else Fraction(0))
    return -a * Fraction(theta0) + (1 + a) * b * mean + (1 + a) * (1 - b) * theta_t


def round_bits(value: Fraction, dtype: torch.dtype) -> int:
    """The bit pattern of ``value`` rounded half to even into ``dtype`` (IEEE: subnormals; ±inf
    when |value| ≥ largest + half an ulp of it; an exact 0 is +0). Integer arithmetic only."""
    precision, exponent_bits, width, _ = FORMATS[dtype]
    bias = (1 << (exponent_bits - 1)) - 1
    sign = (1 << (width - 1)) if value < 0 else 0
    size = abs(value)
    if size == 0:
        return 0
    exponent = size.numerator.bit_length() - size.denominator.bit_length()
    if Fraction(2) ** exponent > size:
        exponent -= 1
    exponent = max(exponent, 1 - bias)
    scaled = size * Fraction(2) ** (precision - 1 - exponent)  # the significand in ulps
    whole, remainder = divmod(scaled.numerator, scaled.denominator)
    if 2 * remainder > scaled.denominator or (2 * remainder == scaled.denominator and whole & 1):
        whole += 1
    if whole == 1 << precision:  # carried into the next binade
        whole, exponent = whole >> 1, exponent + 1
    if exponent > bias:
        return sign | (((1 << exponent_bits) - 1) << (precision - 1))
    if whole < 1 << (precision - 1):  # subnormal
        return sign | whole
    return sign | ((exponent + bias) << (precision - 1)) | (whole - (1 << (precision - 1)))


def bits_of(tensor: torch.Tensor) -> list[int]:
    """The unsigned bit patterns of a bf16/fp16/fp32 tensor."""
    width = FORMATS[tensor.dtype][2]
    return [b & ((1 << width) - 1) for b in tensor.view(FORMATS[tensor.dtype][3]).tolist()]
