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
