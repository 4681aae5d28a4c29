"""One correct rounding of the exact formula, for the elements float64 cannot decide.

The kernel (``formula``) computes θ in float64 and lets torch cast it. That is the exact formula
rounded once everywhere except near a rounding boundary of the output format: float64 carries an
error (from α and λ as doubles and from its own operations), and torch casts float64 to bfloat16
or float16 through float32, which rounds twice. ``Rounding.suspects`` finds, per slice and with
a few vectorised operations, every element whose float64 value lies within a rigorous error bound
of a midpoint of the output grid (or is too small for the bound to be relative, or is in the
output's subnormal range); ``Rounding.fix`` rounds exactly those again, correctly:

- the cell of the output grid around the float64 value (``frexp``): the two neighbours and their
  midpoint μ, all exact in float64;
- where the float64 value is farther from μ than the error bound, it decides the side;
- otherwise the sign of x − μ, with x = Σ cᵢθᵢ / L (integer cᵢ, L from α and λ as decimals), is
  found without error: each cᵢθᵢ split into exact float64 products, summed by error-free
  transformations (TwoSum) until the sign is certain; a tie rounds to even;
- whatever that leaves undecided (an exact zero, a value below the bound) is computed with
  ``fractions.Fraction``: rare, and one element at a time.

"Exact" uses α and λ as the decimals written in the config: the double the YAML parser made of
``0.3`` is read back as its shortest decimal (``repr``), 3/10.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import reduce

import torch


@dataclass(frozen=True)
class Grid:
    """A binary floating-point format: precision (with the implicit bit) and exponent range."""

    precision: int
    emin: int
    emax: int
    window: int  # float64 ulps around a midpoint that are always re-rounded (≥ the float32 hazard)

    @property
    def tail(self) -> int:  # float64 fraction bits below the format's last bit
        return 53 - self.precision

    @property
    def largest(self) -> Fraction:
        return (2 - Fraction(2) ** (1 - self.precision)) * Fraction(2) ** self.emax


# bf16/fp16: torch rounds float64 → float32 → target; the window (2^30 float64 ulps = 2 float32
# ulps) covers every value whose float32 rounding lands on a midpoint. float32: one rounding.
GRIDS = {
    torch.bfloat16: Grid(8, -126, 127, 1 << 30),
    torch.float16: Grid(11, -14, 15, 1 << 30),
    torch.float32: Grid(24, -126, 127, 1 << 18),
}
_ONE = 0x3FF0000000000000  # the bits of 1.0: a window value becomes a float in [1, 2)
U = 2.0**-52


# The ``out_dtype`` of the merge that is running, so that the kernel rounds straight into it
# (mergekit casts the kernel's result to ``out_dtype`` afterwards: a second rounding, unless the
# result already lies on that grid). Process-wide, not a ContextVar: mergekit's multi-GPU
# executor runs the kernel on its own threads. Set only for the duration of ``run_merge``.
_output: list[torch.dtype] = []
_output_lock = threading.Lock()


@contextmanager
def rounding_into(dtype: torch.dtype | None) -> Iterator[None]:
    """Within this block, the expo kernel rounds its results once into ``dtype``."""
    if dtype is None:
        yield
        return
    with _output_lock:
        _output.append(dtype)
    try:
        yield
    finally:
        with _output_lock:
            _output.pop()


def output_dtype() -> torch.dtype | None:
    """The ``out_dtype`` of the running merge (``None``: the result keeps the working dtype)."""
    return _output[-1] if _output else None


def decimal(value: float) -> Fraction:
    """The decimal the user wrote, from the double the parser made of it."""
    return Fraction(repr(float(value)))


def weights(alpha: float, lam: float, count: int) -> list[Fraction]:
    """θ's exact weights on (θ_T, θ₀, θ₁…θₙ): the kernel's input order."""
    a, b = decimal(alpha), decimal(lam)
    if not b:
        return [1 + a, -a]
    return [(1 + a) * (1 - b), -a, *[(1 + a) * b / count] * count]


def round_fraction(value: Fraction, grid: Grid) -> float:
    """``value`` rounded half to even into ``grid`` (subnormals; ±inf from max + half an ulp)."""
    if value == 0:
        return 0.0
    size = abs(value)
    exponent = size.numerator.bit_length() - size.denominator.bit_length()
    if Fraction(2) ** exponent > size:
        exponent -= 1
    ulp = Fraction(2) ** (max(exponent, grid.emin) - grid.precision + 1)
    rounded = round(size / ulp) * ulp  # round() on a Fraction rounds half to even
    result = math.inf if rounded > grid.largest else float(rounded)
    return -result if value < 0 else result


class Rounding:
    """The exact rounding of one call's results into ``dtype`` (``None``: not a covered format)."""

    def __init__(self, alpha: float, lam: float, inputs: list[torch.Tensor], dtype: torch.dtype):
        self.grid = GRIDS.get(dtype)
        count = len(inputs) - 2
        self.weights = weights(alpha, lam, count)[: len(inputs)]
        denominator = reduce(math.lcm, (w.denominator for w in self.weights), 1)
        self.coefficients = [int(w * denominator) for w in self.weights]
        self.denominator = denominator
        # |float64 result − exact| ≤ bound · max|input| (module notes in docs/numerics.md)
        self.bound = U * (count + 48) * (1 + abs(alpha)) * (1 + abs(lam))
        self.split = any(t.dtype == torch.float64 for t in inputs)
        largest = max((_largest(t) for t in inputs), default=0.0)
        if self.grid is None or not math.isfinite(largest):
            self.grid = None  # inf/NaN inputs are refused by the callers; nothing to decide
            return
        grid = self.grid
        # below ``small`` the bound may exceed the window: every such element is re-rounded
        self.small = max(self.bound * largest * 2.0**53 / grid.window, 2.0 ** (grid.emin + 1))
        mask = (1 << grid.tail) - 1
        self.offset = grid.window - (1 << (grid.tail - 1))
        self.mask = mask
        self.limit = _as_float(_ONE | (2 * grid.window))

    def suspects(self, y: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor | None:
        """Indices of the elements of ``y`` (float64) that need ``fix``; ``None`` if none.

        ``scratch`` is a float64 buffer of ``y``'s size that may be overwritten.
        """
        if self.grid is None or y.numel() == 0:
            return None
        window = scratch.view(torch.int64)
        torch.add(y.view(torch.int64), self.offset, out=window)
        window.bitwise_and_(self.mask).bitwise_or_(_ONE)  # (tail − midpoint + W) mod 2^tail
        near = float(scratch.amin()) <= self.limit
        if not near:
            torch.abs(y, out=scratch)
            if not float(scratch.amin()) < self.small:
                return None
            torch.add(y.view(torch.int64), self.offset, out=window)
            window.bitwise_and_(self.mask).bitwise_or_(_ONE)
        flagged = (scratch <= self.limit) | (y.abs() < self.small)
        return flagged.nonzero().view(-1)

    def fix(self, written: torch.Tensor, index: torch.Tensor, y: torch.Tensor,
            inputs: list[torch.Tensor]) -> None:
        """Write the correctly rounded θ at ``index`` of ``written`` (the output slice)."""
        grid = self.grid
        guess = y.index_select(0, index)
        finite = torch.isfinite(guess)
        if not bool(finite.all()):
            index, guess = index[finite], guess[finite]
        values = [t.index_select(0, index).double() for t in inputs]
        size = guess.abs()
        error = values[0].abs()
        for value in values[1:]:
            torch.maximum(error, value.abs(), out=error)
        error.mul_(self.bound)
        # the output grid's cell around the float64 value: [low, low + ulp], midpoint μ
        exponent = size.view(torch.int64).bitwise_right_shift(52).clamp_(min=grid.emin + 1023)
        ulp = exponent.sub_(grid.precision - 1).bitwise_left_shift_(52).view(torch.float64)
        steps = torch.floor(size / ulp)
        low = steps * ulp
        mid = low + ulp / 2
        order, known = _sign_of_sum(
            values, self.coefficients, mid.copysign(guess), self.denominator, self.split
        )
        order = torch.where(guess < 0, -order, order)  # |x| against μ: x has y's sign where
        usable = (error < ulp / 4) & (error < size)  # the bound is below |y| (usable)
        known &= usable
        far = ~known & ((size - mid).abs() > error)  # the float64 value's side is x's side
        order = torch.where(far, torch.sign(size - mid).to(order.dtype), order)
        odd = steps.to(torch.int64).bitwise_and_(1).bool()
        up = torch.where(order == 0, odd, order > 0)  # a tie goes to the even neighbour
        results = torch.where(up, low + ulp, low).copysign_(guess)
        results.masked_fill_(error == 0, 0.0)  # every input is 0: an exact +0
        rest = (~known & ~far & (error > 0)).nonzero().view(-1)
        if rest.numel():
            results[rest] = torch.tensor(
                self._by_fractions([v[rest] for v in values]), dtype=torch.float64
            )
        written[index] = results.to(written.dtype)

    def _by_fractions(self, values: list[torch.Tensor]) -> list[float]:
        weights = self.weights
        return [
            round_fraction(sum(w * Fraction(v) for w, v in zip(weights, row, strict=True)),
                           self.grid)
            for row in zip(*(v.tolist() for v in values), strict=True)
        ]


def _largest(tensor: torch.Tensor) -> float:
    if tensor.numel() == 0:
        return 0.0
    low, high = torch.aminmax(tensor)
    return max(-float(low), float(high))


def _as_float(bits: int) -> float:
    return float(torch.tensor(bits, dtype=torch.int64).view(torch.float64))


def _pieces(value: int) -> list[float]:
    """``value`` as floats of ≤ 26 significant bits whose sum is exact."""
    sign, value = (-1 if value < 0 else 1), abs(value)
    pieces, shift = [], 0
    while value:
        chunk = value & ((1 << 26) - 1)
        if chunk:
            pieces.append(sign * math.ldexp(chunk, shift))
        value >>= 26
        shift += 26
    return pieces


def _halves(value: torch.Tensor) -> list[torch.Tensor]:
    """A float64 as two floats of ≤ 26 bits (Veltkamp's split), so products stay exact."""
    big = value * 134217729.0  # 2^27 + 1
    high = big - (big - value)
    return [high, value - high]


def _sign_of_sum(values, coefficients, mid, denominator, split, passes: int = 6):
    """The sign of Σ cᵢvᵢ − L·μ, exactly; and where it is known (else: too many passes)."""
    terms = []
    for value, coefficient in zip(values, coefficients, strict=True):
        parts = _halves(value) if split else [value]
        terms += [part * piece for part in parts for piece in _pieces(coefficient)]
    terms += [mid * -piece for piece in _pieces(denominator)]
    for _ in range(passes):
        for i in range(1, len(terms)):  # TwoSum cascade: terms[-1] the sum, the rest its error
            a, b = terms[i - 1], terms[i]
            total = a + b
            back = total - b
            terms[i - 1], terms[i] = (a - back).add_(b - (total - back)), total
        top, rest = terms[-1], terms[0].abs()
        for term in terms[1:-1]:
            rest.add_(term.abs())
        known = (rest == 0) | (top.abs() > rest * (1 + 2.0**-40))
        if bool(known.all()) or len(terms) == 1:
            break
    return torch.sign(top).to(torch.int8), known
