"""0 elements off the exact formula, rounded once, for every input and output dtype (issue 20).

The reference (``reference.exact_formula`` and ``reference.round_bits``) uses no torch cast:
``fractions.Fraction`` for the value, α and λ as the decimals written, and an own
round-half-to-even into each format's bit layout (subnormals; ±inf only from the largest finite
plus half its ulp). Every element below is checked against it, bit for bit. The inputs are the
ones a float64 kernel gets wrong: θ₀ = θ₁·2⁻ᵏ (double rounding through float32), values on and
next to rounding midpoints of the output, near its largest finite, its smallest normal, its
subnormals, and ±0.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import FORMATS, bits_of, exact_formula, round_bits

from mergekit_expo.merge.formula import extrapolate

# every test with the compiled kernel and with the torch one (see conftest.each_kernel)
pytestmark = pytest.mark.usefixtures("each_kernel")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PAIRS = list(itertools.product(DTYPES, DTYPES))
LAMBDAS = ["0", "0.3", "1"]
ALPHAS = ["0.3", "0.5", "1.7"]


def _step(values: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``values`` moved by ``steps`` units in the last place (finite inputs only)."""
    view = FORMATS[values.dtype][3]
    moved = (values.view(view).long() + steps).to(view).view(values.dtype)
    return torch.where(torch.isfinite(moved), moved, values)


def _grid_points(dtype: torch.dtype, out: torch.dtype, count: int, gen) -> torch.Tensor:
    """Output-grid values and midpoints, as float64: random, extreme, subnormal, zero."""
    precision = FORMATS[out][0]
    info = torch.finfo(out)
    mant = torch.randint(1 << (precision - 1), 1 << precision, (count,), generator=gen)
    exps = torch.randint(-12, 12, (count,), generator=gen)
    values = torch.ldexp(mant.double(), exps - (precision - 1))
    half = torch.ldexp(torch.ones(count, dtype=torch.float64), exps - precision)
    largest, tiny, sub = info.max, info.tiny, info.smallest_normal * 2.0 ** (1 - precision)
    top_half = 2.0 ** ((1 << (FORMATS[out][1] - 1)) - 1 - precision)  # half an ulp of max
    extremes = torch.tensor([largest, largest + top_half, largest - top_half, tiny, tiny / 2,
                             tiny - sub / 2, sub, sub / 2, 3 * sub / 2, 0.0], dtype=torch.float64)
    points = torch.cat([values, values + half, extremes.repeat(max(1, count // 40))])
    sign = torch.randint(0, 2, points.shape, generator=gen) * 2 - 1
    return points * sign


def cases(source: str, target: str, lam: str, seed: int):
    """θ₀, θ_T and two intermediates (``source`` dtype) aimed at ``target``'s rounding edges."""
    dtype, out = DTYPES[source], DTYPES[target]
    gen = torch.Generator().manual_seed(seed)
    # θ₀ = θ₁·2⁻ᵏ, k = 0…60
    theta1 = (torch.rand(61 * 8, generator=gen) * 2 - 1).double().to(dtype)
    k = torch.arange(61).repeat_interleave(8)
    sweep0 = (theta1.double() * torch.pow(2.0, -k.double())).to(dtype)
    # on and next to the output's midpoints and extremes: θ₁ there, θ₀ a few ulps away
    near = _grid_points(dtype, out, 300, gen)
    near = _step(near.to(dtype), torch.randint(-3, 4, near.shape, generator=gen))
    near0 = _step(near, torch.randint(-8, 9, near.shape, generator=gen))
    final = torch.cat([theta1, near])
    theta0 = torch.cat([sweep0, near0])
    finite = torch.isfinite(final) & torch.isfinite(theta0)
    final, theta0 = final[finite], theta0[finite]
    if lam == "0":
        return theta0, final, ()
    spread = torch.randint(0, 3, final.shape, generator=gen)
    first, second = _step(final, spread), _step(final, -spread)
    return theta0, final, (first, second)


def expected_bits(theta0, final, intermediates, *, alpha, lam, out):
    rows = zip(theta0.tolist(), final.tolist(), *(t.tolist() for t in intermediates), strict=True)
    return [
        round_bits(exact_formula(t0, ft, mids, alpha=alpha, lam=lam), out)
        for t0, ft, *mids in rows
    ]


@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize(("source", "target"), PAIRS)
def test_every_element_is_the_exact_formula_rounded_once(source, target, lam):
    alpha = ALPHAS[(PAIRS.index((source, target)) + LAMBDAS.index(lam)) % len(ALPHAS)]
    theta0, final, mids = cases(source, target, lam, seed=PAIRS.index((source, target)))
    out = torch.empty(final.shape, dtype=DTYPES[target])
    extrapolate(theta0, final, mids, alpha=float(alpha), lam=float(lam), out=out)
    expected = expected_bits(theta0, final, mids, alpha=alpha, lam=lam, out=out.dtype)
    got = bits_of(out)
    wrong = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not wrong, (len(wrong), len(got), wrong[:5])


ISSUE_CASES = [  # θ₀, θ₁, α, dtype, the exact value rounded once
    (-(2.0**-30), 0.205078125, "0.3", torch.bfloat16, 0.267578125),  # double rounding
    (0.001, 50400.0, "0.3", torch.float16, 65504.0),  # 65519.9997: finite, not an overflow
    (0.0, 65504.0, "0.0003", torch.float16, 65504.0),  # 65523.65 ≥ 65520: +inf
]


@pytest.mark.parametrize(("theta0", "theta1", "alpha", "dtype", "_"), ISSUE_CASES)
def test_issue_examples(theta0, theta1, alpha, dtype, _):
    t0, t1 = torch.tensor([theta0], dtype=dtype), torch.tensor([theta1], dtype=dtype)
    got = extrapolate(t0, t1, alpha=float(alpha))
    expected = round_bits(exact_formula(t0.item(), t1.item(), alpha=alpha), dtype)
    assert bits_of(got) == [expected]


def test_reference_rounds_as_ieee_on_representable_values():
    """The reference itself: torch's casts of float32 to each format where float32 holds the
    value exactly are single roundings, so they must agree (a check of the bit layout)."""
    gen = torch.Generator().manual_seed(5)
    values = torch.cat([torch.randn(2000, generator=gen) * 10.0 ** torch.randint(-8, 8, (2000,),
                                                                                  generator=gen),
                        torch.tensor([0.0, 65519.0, 65520.0, 3e38, 1e-40, -1e-45, 6e-8])])
    from fractions import Fraction

    for dtype in (torch.bfloat16, torch.float16):
        assert [round_bits(Fraction(v), dtype) for v in values.tolist()] == bits_of(
            values.to(dtype))


def _eligible_pairs(out: torch.dtype, alpha: str, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 pairs that the compiled kernel computes in float32 (nonzero, normal, exponents
    close): near the output's midpoints and extremes, near-cancellations (tiny and subnormal
    results) where θ₀ ≈ θ₁(1+α)/α, and DPO-like pairs."""
    near = _grid_points(torch.bfloat16, out, 3000, gen)
    final = _step(near.to(torch.bfloat16), torch.randint(-3, 4, near.shape, generator=gen))
    theta0 = _step(final, torch.randint(-8, 9, near.shape, generator=gen))
    a = float(alpha)
    scale = 2.0 ** torch.randint(-126, -100, (2000,), generator=gen).double()
    if out == torch.float16:  # around the float16 subnormals
        scale = 2.0 ** torch.randint(-30, -12, (2000,), generator=gen).double()
    small1 = ((torch.rand(2000, generator=gen).double() + 1) * scale).to(torch.bfloat16)
    small0 = _step((small1.double() * (1 + a) / a).to(torch.bfloat16),
                   torch.randint(-2, 3, (2000,), generator=gen))
    # DPO-like weights: many results are exact midpoints (ties)
    sft = torch.randn(4096, generator=gen) * 0.02
    tuned = (sft + torch.randn(4096, generator=gen) * 7e-4).to(torch.bfloat16)
    final = torch.cat([final, small1, tuned])
    theta0 = torch.cat([theta0, small0, sft.to(torch.bfloat16)])
    fields = [(t.view(torch.int16).int() & 0x7F80) >> 7 for t in (final, theta0)]
    keep = ((fields[0] > 0) & (fields[1] > 0) & (fields[0] < 240) & (fields[1] < 240)
            & ((fields[0] - fields[1]).abs() <= 6))
    final, theta0 = final[keep], theta0[keep]
    whole = final.numel() // 512 * 512  # whole blocks of the kernel, each of them eligible
    return theta0[:whole], final[:whole]


@pytest.mark.parametrize("alpha", ["0.3", "0.5", "1.7", "25"])
@pytest.mark.parametrize("target", ["bf16", "fp16"])
def test_bf16_pairs_in_float32_blocks(target, alpha):
    """The compiled kernel's float32 blocks (bf16 inputs, 16-bit output) are exact too."""
    out_dtype = DTYPES[target]
    theta0, final = _eligible_pairs(out_dtype, alpha, torch.Generator().manual_seed(11))
    assert final.numel() >= 2048
    out = torch.empty(final.shape, dtype=out_dtype)
    extrapolate(theta0, final, alpha=float(alpha), out=out)
    expected = expected_bits(theta0, final, (), alpha=alpha, lam="0", out=out_dtype)
    got = bits_of(out)
    wrong = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not wrong, (len(wrong), len(got), wrong[:5])


@pytest.mark.parametrize(("source", "target"), [("fp32", "fp32"), ("fp32", "bf16"),
                                                ("bf16", "bf16"), ("fp16", "fp16")])
def test_decimal_alpha_onto_a_midpoint_and_next_to_it(source, target):
    """α = 0.3: 13θ₁/10 lands exactly on a midpoint of the output grid (θ₁ = 5m·2^e, 13m an
    odd number one bit longer than the output's precision); θ₀ = ±θ₁·2⁻ᵏ moves the exact value
    a hair off it (or not at all: a tie). A kernel that rounds through a float32 or decides
    from an inexact product goes the wrong way here."""
    precision = FORMATS[DTYPES[target]][0]
    low, high = -(-(1 << precision) // 13), (1 << (precision + 1)) // 13
    inputs = FORMATS[DTYPES[source]][0]
    ms = [m for m in range(low | 1, high + 1, 2) if 5 * m < 1 << inputs][:200]
    assert ms
    rows = []
    for index, m in enumerate(ms):
        theta1 = 5.0 * m * 2.0 ** (-6 - index % 5)
        for k in [*range(0, 61, 3), None]:
            for sign in (1, -1):
                theta0 = 0.0 if k is None else sign * theta1 * 2.0**-k
                rows.append((theta0, theta1))
    dtype = DTYPES[source]
    theta0 = torch.tensor([r[0] for r in rows], dtype=torch.float64).to(dtype)
    final = torch.tensor([r[1] for r in rows], dtype=torch.float64).to(dtype)
    assert torch.equal(final.double(), torch.tensor([r[1] for r in rows], dtype=torch.float64))
    out = torch.empty(final.shape, dtype=DTYPES[target])
    extrapolate(theta0, final, alpha=0.3, out=out)
    expected = expected_bits(theta0, final, (), alpha="0.3", lam="0", out=out.dtype)
    got = bits_of(out)
    wrong = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not wrong, (len(wrong), len(got), wrong[:5])


@pytest.mark.parametrize(("alpha", "lam"), [("0.4", "0.3"), ("0.5", "1"), ("1.7", "0.3")])
def test_iterative_merge_on_dpo_like_blocks(alpha, lam):
    """Whole blocks of bf16 checkpoints of one run (the compiled kernel sums them in double
    where that is exact): ordinary weights, and blocks where θ₀ lies 2⁻³⁶…2⁻⁶⁰ below θ_T,
    which double cannot add exactly — there θ₀ alone decides every tie."""
    gen = torch.Generator().manual_seed(21)
    sft = torch.randn(4096, generator=gen) * 0.02
    steps = [sft + torch.randn(4096, generator=gen) * 7e-4 * (i + 1) for i in range(3)]
    theta0 = sft.to(torch.bfloat16)
    first, second, final = (s.to(torch.bfloat16) for s in steps)
    far = final[2048:].double() * 2.0 ** -torch.randint(36, 61, (2048,), generator=gen).double()
    theta0 = torch.cat([theta0[:2048], far.to(torch.bfloat16)])
    # a block of tiny, subnormal and zero results: every θ the same v ≈ 2⁻¹²⁰, θ₀ ≈ v·w/a
    # with w = (1+α) the weight left on v, a few ulps off
    v = ((torch.rand(512, generator=gen).double() + 1) * 2.0**-120).to(torch.bfloat16)
    a = float(alpha)
    w = _step((v.double() * (1 + a) / a).to(torch.bfloat16),
              torch.randint(-2, 3, (512,), generator=gen))
    theta0, first, second, final = (torch.cat([x, y]) for x, y in
                                    ((theta0, w), (first, v), (second, v), (final, v)))
    mids = (first, second)
    out = torch.empty(final.shape, dtype=torch.bfloat16)
    extrapolate(theta0, final, mids, alpha=float(alpha), lam=float(lam), out=out)
    expected = expected_bits(theta0, final, mids, alpha=alpha, lam=lam, out=out.dtype)
    got = bits_of(out)
    wrong = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not wrong, (len(wrong), len(got), wrong[:5])
