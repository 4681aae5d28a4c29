"""Elements off the exact formula rounded once: the kernel before issue 20 and today's.

The reference is ``tests/reference.py``'s ``exact_formula`` (``fractions.Fraction``, α and λ as
the decimals written) and ``round_bits`` (an own round-half-to-even into each format's bits), no
torch cast. Run: ``python -m benchmarks exactness``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from reference import bits_of, exact_formula, round_bits  # noqa: E402


def _weights(count: int, seed: int, dtype, scale=0.02, base=None, step=0.03):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, generator=generator, dtype=torch.float64)
    if base is None:
        return (noise * scale).to(dtype)
    return (base.double() + noise * scale * step).to(dtype)


def cases(count: int):
    """name → (θ₀, θ_T, intermediates, α, λ, output dtype, what the old path did to out)."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    theta1 = _weights(count, 1, bf16)
    out = {}
    for k in (0, 10, 20, 23, 30, 40, 60):
        theta0 = (theta1.double() * 2.0**-k).to(bf16)
        out[f"bf16, θ₀ = θ₁·2^-{k}, α 0.3"] = (theta0, theta1, (), "0.3", "0", bf16)
    out["fp16, θ₀ 0.001, θ₁ 50400, α 0.3 (1 element)"] = (
        torch.tensor([0.001], dtype=fp16), torch.tensor([50400.0], dtype=fp16), (), "0.3", "0",
        fp16)
    sft = _weights(count, 2, fp32)
    mids = [_weights(count, 3 + i, fp32, base=sft) for i in range(3)]
    final = _weights(count, 7, fp32, base=sft)
    out["fp32, λ 1, α 0.5, three intermediates"] = (sft, final, mids, "0.5", "1", fp32)
    out["fp32, λ 0.3, α 0.4, three intermediates"] = (sft, final, mids, "0.4", "0.3", fp32)
    sft16 = sft.to(bf16)
    out["bf16 θ₀, fp32 θ₁, written as bf16 (out_dtype), α 0.7"] = (
        sft16, final, (), "0.7", "0", bf16)
    pair0 = _weights(count, 8, bf16)
    pair1 = _weights(count, 9, bf16, base=pair0, step=0.035)
    out["bf16 weights, α 0.5"] = (pair0, pair1, (), "0.5", "0", bf16)
    out["bf16 weights, α 1.7"] = (pair0, pair1, (), "1.7", "0", bf16)
    return out


def _old(formula, theta0, final, mids, alpha, lam, dtype):
    """The old path: the kernel in the inputs' promoted dtype, then cast (mergekit's out_dtype)."""
    working = torch.promote_types(theta0.dtype, final.dtype)
    result = formula.extrapolate(theta0.to(working), final.to(working),
                                 [m.to(working) for m in mids], alpha=alpha, lam=lam)
    return result.to(dtype)


def main(count: int) -> str:
    from benchmarks.baseline import BEFORE_EXACT_ROUNDING, old_formula
    from mergekit_expo.merge.formula import extrapolate

    old = old_formula()
    total_after = 0
    lines = [f"elements off the exact formula rounded once (of the count shown); before = "
             f"the kernel at {BEFORE_EXACT_ROUNDING}, after = today's",
             f"{'case':58s} {'elements':>9s} {'before':>7s} {'after':>6s}"]
    for name, (theta0, final, mids, alpha, lam, dtype) in cases(count).items():
        rows = zip(*(t.tolist() for t in (theta0, final, *mids)), strict=True)
        expected = [round_bits(exact_formula(t0, ft, rest, alpha=alpha, lam=lam), dtype)
                    for t0, ft, *rest in rows]
        before = _old(old, theta0, final, mids, float(alpha), float(lam), dtype)
        after = torch.empty(final.shape, dtype=dtype)
        extrapolate(theta0, final, mids, alpha=float(alpha), lam=float(lam), out=after)
        counts = [sum(g != e for g, e in zip(bits_of(r), expected, strict=True))
                  for r in (before, after)]
        total_after += counts[1]
        lines.append(f"{name:58s} {len(expected):9,d} {counts[0]:7,d} {counts[1]:6,d}")
    zero = [torch.tensor(c, dtype=torch.bfloat16) for c in zip(*ZERO_ROWS, strict=True)]
    sizes = [float(f(zero[0], zero[1], zero[2:], alpha=0.5, lam=0.3).double().abs().max())
             for f in (old.extrapolate, extrapolate)]
    lines.append(f"{'largest |θ| where the exact θ is 0 (3 elements)':58s} {'':9s} "
                 f"{sizes[0]:7.2g} {sizes[1]:6.2g}")
    total_after += int(sizes[1] != 0)
    lines.append(f"after: {total_after} elements off in all cases")
    return "\n".join(lines)


ZERO_ROWS = [  # θ₀, θ_T, θ₁, θ₂ with m + (m − θ₀)/2 = 0 exactly at λ = 0.3 (tests/test_exact_ties)
    (0.000732421875, -0.002685546875, 0.006103515625, 0.008056640625),
    (-0.0003662109375, 0.0013427734375, -0.0042724609375, -0.0028076171875),
    (-0.09375, 0.34375, -0.96875, -0.84375),
]
