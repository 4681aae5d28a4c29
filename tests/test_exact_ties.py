"""0 elements off an exact reference, on inputs full of exact bf16 rounding ties (issue 9, item 5).

The inputs are built so that the exact result θ₁ + α(θ₁ − θ₀) (and m + α(m − θ₀) with
m = θ_T + λ(θ̄ − θ_T)) lies exactly half-way between two bf16 numbers for three elements in four:
the one place where the rounding is decided by the arithmetic and not by the data, so a kernel
that computes in float32, rounds twice or sums large products fails here even though it agrees
with the formula on > 99.99 % of ordinary weights.

Which α is "exact"? The user writes ``alpha: 0.3``: the decimal 3/10, which YAML hands to
mergekit as the double nearest to it, 0.299999999999999988897769753748... The reference uses the
decimal the user wrote, ``Fraction("0.3")``. On bf16 inputs the float64 kernel cannot tell the
double from 3/10 anywhere but at an exact tie (elsewhere the exact result is at least 2⁻²⁰ of its
size away from a bf16 rounding boundary, the double's error is 2⁻⁵⁴), and at a tie the double's
error is far below float64's resolution, so the kernel lands on the tie and rounds it half to
even, as the exact decimal formula does. The exact double, ``Fraction(0.3)``, would instead push
every tie a hair down and round it toward zero: a rounding decided by the binary
representation of the number the user typed, not by the formula. The test
``test_exact_double_alpha_differs_only_on_decimal_ties`` states that difference exactly.

The float64 reference below is exact, not approximate: with α = p/q and λ = a/b the numerator
q·b·θ is an integer combination of bf16 values (at most ~30 significant bits, so exact in
float64), one IEEE division by q·b rounds it correctly, and the cast to bf16 cannot double-round:
the exact quotient is either a tie (then representable, and the division is exact) or at least
2⁻²⁰ of its size from any bf16 rounding boundary, far beyond the division's 2⁻⁵³.
``test_float64_reference_equals_fractions`` checks it against ``fractions.Fraction`` element by
element.
"""

from __future__ import annotations

import functools
import shutil
from fractions import Fraction

import pytest
import torch
from conftest import run_merge_in_process, write_config
from reference import bits_of, exact_formula, load, round_bits
from safetensors.torch import save_file
from test_merge_graph import expo_config

from mergekit_expo.merge.formula import extrapolate

# every test with the compiled kernel and with the torch one (see conftest.each_kernel)
pytestmark = pytest.mark.usefixtures("each_kernel")

ALPHAS = ["0.5", "0.3", "1.7"]  # as the user writes them
LAMBDA = "0.3"


UNIT = 2.0**-30  # inputs are integers in units of 2^-30: |values| from 2^-13 to 1


def _bf16_units(count: int, generator: torch.Generator) -> torch.Tensor:
    """Random bf16 numbers as integers: an 8-bit mantissa times 2^s, either sign."""
    mantissa = torch.randint(128, 256, (count,), generator=generator)
    shift = torch.randint(10, 23, (count,), generator=generator)
    sign = torch.randint(0, 2, (count,), generator=generator) * 2 - 1
    return sign * mantissa * torch.pow(2, shift)


@functools.lru_cache
def _tie_pool(alpha: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (θ₀, θ₁) of bf16 numbers, of sizes up to 2^12 apart, whose exact result is a tie.

    Rejection sampling in integers: θ₁ + α(θ₁ − θ₀) = B + p(B − A)/q must be an integer whose
    odd part has exactly 9 bits (a bf16 number has 8: the 9th, set, is the half-way point).
    Inputs of different sizes matter: where α(θ₁ − θ₀) is as large as the result, a float32
    kernel's error in α reaches the result's last bit.
    """
    fraction = Fraction(alpha)
    p, q = fraction.numerator, fraction.denominator
    generator = torch.Generator().manual_seed(1234)
    a, b = _bf16_units(1_000_000, generator), _bf16_units(1_000_000, generator)
    divisible = (b - a) % q == 0
    result = torch.where(divisible, b + torch.div(p * (b - a), q, rounding_mode="floor"), 0)
    size = result.abs()
    odd = size // torch.where(size > 0, size & -size, 1)
    tie = divisible & (odd >= 257) & (odd < 512)
    return a[tie], b[tie]


def ties(shape, alpha: str, *, seed: int = 0):
    """θ₀, θ_T and two intermediates (bf16) whose exact result is a bf16 tie (3 in 4).

    ExPO: θ₀ and θ₁ (``expo_final``) from the pool. (λ, α) with λ = 3/10: the same θ₁ plays
    m = θ_T + λ(θ̄ − θ_T), reached from θ_T = m − 6j·u and θ̄ = m + 14j·u (u = the last bit of m),
    so λ(θ̄ − θ_T) = 6j·u exactly. One element in four is ordinary: θ₀ a few ulps from θ₁.
    """
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.Size(shape).numel())

    def randint(low, high):
        return torch.randint(low, high, (n,), generator=generator)

    pool_a, pool_b = _tie_pool(alpha)
    pick = randint(0, len(pool_a))
    theta0, m = pool_a[pick], pool_b[pick]
    last_bit = m.abs() & -m.abs()
    plain = randint(0, 4) == 0  # ordinary elements
    nearby = m + last_bit * randint(-6, 7)
    theta0 = torch.where(plain & _is_bf16(nearby), nearby, theta0)
    fraction = Fraction(alpha)  # an exact 0 is a known limit, tested on its own below
    zero = fraction.denominator * m + fraction.numerator * (m - theta0) == 0
    theta0 = torch.where(zero, pool_a[pick], theta0)
    j, d = randint(-2, 3), randint(0, 4)
    final, mean = m - 6 * j * last_bit, m + 14 * j * last_bit
    first, second = mean - 2 * d * last_bit, mean + 2 * d * last_bit
    fits = _is_bf16(final) & _is_bf16(first) & _is_bf16(second)
    final, first, second = (torch.where(fits, t, m) for t in (final, first, second))
    values = {"reference": theta0, "expo_final": m, "final": final,
              "intermediates": (first, second)}

    def bf16(units):
        out = (units.double() * UNIT).to(torch.bfloat16)
        assert torch.equal(out.double(), units.double() * UNIT)  # exactly a bf16 number
        return out.reshape(shape)

    return {
        key: tuple(bf16(v) for v in value) if isinstance(value, tuple) else bf16(value)
        for key, value in values.items()
    }


def _is_bf16(units: torch.Tensor) -> torch.Tensor:
    value = units.double() * UNIT
    return value.to(torch.bfloat16).double() == value


def reference64(theta0, final, intermediates=(), *, alpha: str, lam: str = "0") -> torch.Tensor:
    """θ for α, λ given as decimals, exactly rounded to bf16 (see the module docstring)."""
    a, b = Fraction(alpha), Fraction(lam)
    p, q, s, r = a.numerator, a.denominator, b.numerator, b.denominator
    final = final.double()
    if s:
        mean2 = sum(t.double() for t in intermediates)  # 2·θ̄ with two intermediates, exact
        assert len(intermediates) == 2
        big_m = 2 * r * final + s * (mean2 - 2 * final)  # 2r·m
        scale = 2 * r
    else:
        big_m, scale = final, 1
    numerator = q * big_m + p * (big_m - scale * theta0.double())  # q·scale·θ, exact
    return (numerator / (q * scale)).to(torch.bfloat16)


def round_half_even_bf16(value: Fraction) -> Fraction:
    if value == 0:
        return Fraction(0)
    sign, size = (-1 if value < 0 else 1), abs(value)
    exponent = size.numerator.bit_length() - size.denominator.bit_length()
    if Fraction(2) ** exponent > size:
        exponent -= 1
    ulp = Fraction(2) ** (exponent - 7)
    return sign * round(size / ulp) * ulp  # round(Fraction) rounds half to even


def share_of_ties(theta0, final, alpha: str) -> float:
    pairs = zip(theta0.flatten().tolist()[:2000], final.flatten().tolist()[:2000], strict=True)
    exact = [Fraction(f) + Fraction(alpha) * (Fraction(f) - Fraction(t)) for t, f in pairs]
    return sum(round_half_even_bf16(x) != x for x in exact) / len(exact)


# -- the reference itself -----------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
def test_float64_reference_equals_fractions(alpha):
    inputs = ties((3000,), alpha, seed=1)
    theta0, m, final, mids = (inputs[k] for k in ("reference", "expo_final", "final",
                                                    "intermediates"))
    got = reference64(theta0, m, alpha=alpha)
    got_lam = reference64(theta0, final, mids, alpha=alpha, lam=LAMBDA)
    a, b = Fraction(alpha), Fraction(LAMBDA)
    values = [t.tolist() for t in (theta0, m, final, *mids)]
    for index, (t0, mm, ft, i1, i2) in enumerate(zip(*values, strict=True)):
        t0, mm, ft, i1, i2 = (Fraction(v) for v in (t0, mm, ft, i1, i2))
        assert Fraction(got[index].item()) == round_half_even_bf16(mm + a * (mm - t0))
        mid = ft + b * ((i1 + i2) / 2 - ft)
        assert Fraction(got_lam[index].item()) == round_half_even_bf16(mid + a * (mid - t0))
    assert share_of_ties(theta0, m, alpha) > 0.7  # the inputs really are ties


# -- the kernel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
def test_kernel_rounds_every_tie_exactly(alpha):
    inputs = ties((64, 1000), alpha, seed=2)
    theta0, m = inputs["reference"], inputs["expo_final"]
    out = extrapolate(theta0, m, alpha=float(alpha))
    assert int((out != reference64(theta0, m, alpha=alpha)).sum()) == 0


@pytest.mark.parametrize("alpha", ALPHAS)
def test_kernel_iterative_rounds_every_tie_exactly(alpha):
    inputs = ties((64, 1000), alpha, seed=3)
    theta0, final, mids = inputs["reference"], inputs["final"], inputs["intermediates"]
    out = extrapolate(theta0, final, mids, alpha=float(alpha), lam=float(LAMBDA))
    expected = reference64(theta0, final, mids, alpha=alpha, lam=LAMBDA)
    assert int((out != expected).sum()) == 0


def test_exact_double_alpha_differs_only_on_decimal_ties():
    """Fraction(0.3), the double, rounds the decimal ties toward zero; the kernel follows 3/10."""
    inputs = ties((4000,), "0.3", seed=4)
    theta0, m = inputs["reference"], inputs["expo_final"]
    out = extrapolate(theta0, m, alpha=0.3)
    double = Fraction(0.3)
    assert double < Fraction("0.3")
    differs = 0
    for t0, mm, got in zip(theta0.tolist(), m.tolist(), out.tolist(), strict=True):
        t0, mm = Fraction(t0), Fraction(mm)
        decimal_exact = mm + Fraction("0.3") * (mm - t0)
        if Fraction(got) != round_half_even_bf16(mm + double * (mm - t0)):
            differs += 1
            assert round_half_even_bf16(decimal_exact) != decimal_exact  # only at a tie
            assert Fraction(got) == round_half_even_bf16(decimal_exact)
    assert differs > 1000  # about half of the ties


# -- a real merge and the search, on checkpoints made of ties ----------------------------------


@pytest.fixture(scope="module")
def tie_checkpoints(zoo, tmp_path_factory):
    """Real checkpoints (a tiny Llama's names, shapes, config, tokenizer) filled with ties."""
    template = zoo.base("tie_template", hidden=64, seed=9)
    root = tmp_path_factory.mktemp("ties")
    names = {key: root / key for key in ("theta0", "expo_final", "final", "it1", "it2")}
    tensors = {key: {} for key in names}
    for index, (name, tensor) in enumerate(sorted(load(template).items())):
        built = ties(tuple(tensor.shape), "0.3", seed=100 + index)
        tensors["theta0"][name] = built["reference"]
        tensors["expo_final"][name] = built["expo_final"]
        tensors["final"][name] = built["final"]
        tensors["it1"][name], tensors["it2"][name] = built["intermediates"]
    for key, path in names.items():
        shutil.copytree(template, path, ignore=shutil.ignore_patterns("*.safetensors*"))
        save_file({k: v.contiguous() for k, v in tensors[key].items()},
                  str(path / "model.safetensors"), metadata={"format": "pt"})
    return names



def assert_exact(out: dict, expected: dict) -> None:
    wrong = {name: int((out[name] != expected[name]).sum()) for name in expected}
    assert set(out) == set(expected)
    assert sum(wrong.values()) == 0, {k: v for k, v in wrong.items() if v}


def expected_expo(paths) -> dict:
    theta0, m = load(paths["theta0"]), load(paths["expo_final"])
    return {n: reference64(theta0[n], m[n], alpha="0.3") for n in theta0}


def expected_iterative(paths) -> dict:
    theta0, final = load(paths["theta0"]), load(paths["final"])
    it1, it2 = load(paths["it1"]), load(paths["it2"])
    return {
        n: reference64(theta0[n], final[n], (it1[n], it2[n]), alpha="0.3", lam=LAMBDA)
        for n in theta0
    }


def test_real_merge_expo_rounds_every_tie_exactly(tie_checkpoints, tmp_path):
    paths = tie_checkpoints
    config = expo_config(paths["theta0"], paths["expo_final"], alpha=0.3, warn_relative_change=9)
    assert_exact(load(run_merge_in_process(config, tmp_path / "out")), expected_expo(paths))


def test_real_merge_iterative_rounds_every_tie_exactly(tie_checkpoints, tmp_path):
    paths = tie_checkpoints
    config = expo_config(
        paths["theta0"], paths["it1"], paths["it2"], paths["final"],
        alpha=0.3, warn_relative_change=9, **{"lambda": 0.3},
    )
    out = load(run_merge_in_process(config, tmp_path / "out"))
    assert_exact(out, expected_iterative(paths))


def test_search_candidates_round_every_tie_exactly(tie_checkpoints, tmp_path):
    from mergekit_expo.search.candidates import CandidateWeights
    from mergekit_expo.search.merge_config import load_search_config

    paths = tie_checkpoints
    expo = write_config(
        tmp_path / "expo.yml",
        expo_config(paths["theta0"], paths["expo_final"], alpha=0.3, warn_relative_change=9),
    )
    weights = CandidateWeights(load_search_config(expo), progress=False)
    weights.apply(0.3, 0.0)
    assert_exact(weights.state_dict(), expected_expo(paths))

    iterative = write_config(
        tmp_path / "iterative.yml",
        expo_config(paths["theta0"], paths["it1"], paths["it2"], paths["final"],
                    alpha=0.3, warn_relative_change=9, **{"lambda": 0.3}),
    )
    weights = CandidateWeights(
        load_search_config(iterative), need_intermediates=True, progress=False
    )
    weights.apply(0.3, 0.3)
    assert_exact(weights.state_dict(), expected_iterative(paths))


def test_an_exact_zero_comes_out_as_zero():
    """Where the exact result is 0, α's and λ's binary errors survive the cancellation in
    float64 (a number up to ~1e-17 came out); the kernel finds such elements and writes +0."""
    rows = [  # θ₀, θ_T, θ₁, θ₂: m = θ_T + 0.3(θ̄ − θ_T) = θ₀/3, so m + (m − θ₀)/2 = 0 exactly
        (0.000732421875, -0.002685546875, 0.006103515625, 0.008056640625),
        (-0.0003662109375, 0.0013427734375, -0.0042724609375, -0.0028076171875),
        (-0.09375, 0.34375, -0.96875, -0.84375),
    ]
    theta0, final, first, second = (
        torch.tensor(column, dtype=torch.bfloat16) for column in zip(*rows, strict=True)
    )
    for t0, ft, i1, i2 in rows:
        exact = _mid(ft, i1, i2) + Fraction(1, 2) * (_mid(ft, i1, i2) - Fraction(t0))
        assert exact == 0
    out = extrapolate(theta0, final, [first, second], alpha=0.5, lam=0.3)
    assert out.view(torch.int16).tolist() == [0, 0, 0]  # +0, bit for bit


def _mid(final: float, first: float, second: float) -> Fraction:
    final = Fraction(final)
    return final + Fraction("0.3") * ((Fraction(first) + Fraction(second)) / 2 - final)


@pytest.mark.parametrize("planted", [3, 400])  # rounded from fractions; many: through ``fix``
def test_cancellations_among_ordinary_weights(planted):
    """θ₀ ≈ (13/3)·θ₁ ≈ 10⁻¹¹ among ordinary bf16 weights (where the kernel rounds a whole
    slice at once): θ₁ + 0.3(θ₁ − θ₀) cancels to ~10⁻¹³, below the slice's error bound relative
    to its largest weight, and is rounded on its own; every element is the exact value rounded
    once, bit for bit."""
    gen = torch.Generator().manual_seed(planted)
    theta0 = (torch.randn(4096, generator=gen) * 0.02).to(torch.bfloat16)
    theta1 = (theta0.float() + torch.randn(4096, generator=gen) * 0.0007).to(torch.bfloat16)
    at = torch.randperm(4096, generator=gen)[:planted]
    sign = torch.randint(0, 2, (planted,), generator=gen) * 2 - 1
    small = ((torch.rand(planted, generator=gen) + 1) * 1e-11 * sign).to(torch.bfloat16)
    theta1[at] = small
    theta0[at] = (small.double() * 13 / 3).to(torch.bfloat16)
    out = extrapolate(theta0, theta1, alpha=0.3)
    expected = [
        round_bits(exact_formula(t0, t1, alpha="0.3"), torch.bfloat16)
        for t0, t1 in zip(theta0.tolist(), theta1.tolist(), strict=True)
    ]
    got = bits_of(out)
    wrong = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not wrong, (len(wrong), wrong[:5])


ZERO_ROWS = [  # θ₀, θ_T, θ₁, θ₂ with an exact 0 at α 0.5, λ 0.3 (test_an_exact_zero_...)
    (0.000732421875, -0.002685546875, 0.006103515625, 0.008056640625),
    (-0.0003662109375, 0.0013427734375, -0.0042724609375, -0.0028076171875),
    (-0.09375, 0.34375, -0.96875, -0.84375),
]


@pytest.mark.parametrize("planted", [3, 40])  # rounded from fractions; more: through ``fix``
def test_exact_zeros_among_ordinary_weights(planted):
    """Exact zeros, which float64 misses by up to ~1e-17, among ordinary bf16 weights (where
    the kernel rounds a whole slice at once): each comes out +0, and every other element is
    the exact value rounded once, bit for bit."""
    gen = torch.Generator().manual_seed(planted)
    theta0 = torch.randn(4096, generator=gen) * 0.02
    chain = [theta0 + torch.randn(4096, generator=gen) * 0.0007 for _ in range(3)]
    columns = [t.to(torch.bfloat16) for t in (theta0, *chain)]  # θ₀, θ_T, θ₁, θ₂
    at = torch.randperm(4096, generator=gen)[:planted]
    rows = torch.tensor(ZERO_ROWS, dtype=torch.float64)[torch.arange(planted) % 3]
    scale = torch.ldexp(torch.randint(0, 2, (planted,), generator=gen) * 2.0 - 1,
                        -torch.randint(0, 6, (planted,), generator=gen))
    for column, values in zip(columns, (rows * scale[:, None]).T, strict=True):
        column[at] = values.to(torch.bfloat16)
    theta0, final, first, second = columns
    out = extrapolate(theta0, final, [first, second], alpha=0.5, lam=0.3)
    expected = [
        round_bits(exact_formula(t0, ft, (i1, i2), alpha="0.5", lam="0.3"), torch.bfloat16)
        for t0, ft, i1, i2 in zip(*(c.tolist() for c in columns), strict=True)
    ]
    assert all(expected[i] == 0 for i in at.tolist())
    got = bits_of(out)
    wrong = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert not wrong, (len(wrong), wrong[:5])
