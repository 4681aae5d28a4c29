"""One correct rounding of the exact formula, for the elements float64 cannot decide.

The kernel (``formula``) computes θ in float64 and lets torch cast it. That is the exact formula
rounded once everywhere except near a rounding boundary of the output format: float64 carries an
error (from α and λ as doubles and from its own operations), and torch casts float64 to bfloat16
or float16 through float32, which rounds twice. ``Rounding.suspects`` finds, per slice and with
a few vectorised operations, every element whose float64 value lies within a rigorous error bound
of a midpoint of the output grid (or is too small for the bound to be relative, or is in the
output's subnormal range); ``Rounding.fix`` rounds exactly those again, correctly (for bf16
and fp16 outputs, ``Rounding.snap`` first tries a cheaper way for the whole slice):

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
from functools import cache, reduce

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
FEW = 24  # elements: below this many, fractions are faster than ~40 tensor operations
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


@dataclass(frozen=True)
class Found:
    """The elements of a slice to re-round, and what is known about the slice."""

    index: torch.Tensor
    exact_ties: bool  # a float64 value within ``error`` of a midpoint is an exact tie
    error: float  # |float64 value − exact value| ≤ error
    small: float  # below it, only the exact computation decides


class _Cell:
    """The output grid's cell around float64 values: [low, low + ulp], its midpoint μ."""

    def __init__(self, guess: torch.Tensor, grid: Grid):
        self.guess = guess
        self.size = guess.abs()
        exponent = self.size.view(torch.int64).bitwise_right_shift(52)
        exponent.clamp_(min=grid.emin + 1023).sub_(grid.precision - 1)
        self.ulp = exponent.bitwise_left_shift_(52).view(torch.float64)
        self.steps = torch.floor(self.size / self.ulp)
        self.low = self.steps * self.ulp
        self.mid = self.low + self.ulp / 2

    def part(self, index: torch.Tensor) -> _Cell:
        part = object.__new__(_Cell)
        part.__dict__.update({name: value[index] for name, value in self.__dict__.items()})
        return part

    def odd(self) -> torch.Tensor:
        return self.steps.to(torch.int64).bitwise_and_(1).bool()

    def pick(self, up: torch.Tensor) -> torch.Tensor:
        """low, or low + ulp where ``up``, with the float64 value's sign."""
        return torch.where(up, self.low + self.ulp, self.low).copysign_(self.guess)


class Rounding:
    """The exact rounding of one call's results into ``dtype`` (``None``: not a covered format)."""

    def __init__(self, alpha: float, lam: float, inputs: list[torch.Tensor], dtype: torch.dtype,
                 count: int):
        """``inputs``: θ_T, θ₀ and the intermediates, whose sum over ``count`` is θ̄."""
        self.grid = GRIDS.get(dtype)
        exact = weights(alpha, lam, count)
        self.weights = exact[:2] + exact[2:3] * (len(inputs) - 2)
        denominator = reduce(math.lcm, (w.denominator for w in self.weights), 1)
        self.coefficients = [int(w * denominator) for w in self.weights]
        self.denominator = denominator
        # |float64 result − exact| ≤ bound · max|input| (module notes in docs/numerics.md)
        self.bound = U * (count + 48) * (1 + abs(alpha)) * (1 + abs(lam))
        self.split = any(t.dtype == torch.float64 for t in inputs)
        if any(t.device.type == "meta" for t in inputs):
            self.grid = None  # shapes only: no values to round
        if self.grid is None:
            return
        grid = self.grid
        self.mask = (1 << grid.tail) - 1
        self.offset = grid.window - (1 << (grid.tail - 1))  # the window starts at 0
        self.limits = {  # window values (see _window) at and below which an element is re-rounded
            False: _as_float(_ONE | 2 * grid.window), True: _as_float(_ONE | 3 * grid.window)}
        self.small_limit = 2.0 ** (grid.emin + 1)  # the output's subnormals and next binade
        self.tie_limit = 2.0 ** (grid.precision + 3) * denominator  # see suspects()

    @property
    def snaps(self) -> bool:
        """Whether ``snap`` may apply: bf16 and fp16 outputs (torch casts through float32)."""
        return self.grid is not None and self.grid.precision < 24

    def snap(self, y: torch.Tensor, written: torch.Tensor, inputs: list[torch.Tensor],
             work: torch.Tensor, bits: torch.Tensor) -> bool:
        """Write the exact θ of this slice into ``written`` from its float64 values ``y`` with
        a few whole-slice operations; ``False`` (nothing written) where the slice's inputs do not
        allow it. ``work``, ``bits``: float64 buffers of ``y``'s size that may be overwritten.

        With E the float64 error bound and g the inputs' smallest last bit, an exact value x
        off a midpoint μ of the output grid has |x − μ| ≥ min(g, μ's last bit) / L (see
        ``suspects``). Rounding y to a multiple of a power of two s with E < s/2 and
        s/2 + E < that distance moves every y that lies within E of a midpoint onto it (x *is*
        μ: a tie) and keeps every other y strictly on x's side of every midpoint. That value is
        then rounded once, half to even, to the output grid in float64 (no float32 step), and
        torch's cast of the result is exact. Elements too small for the distance (exact zeros
        among them) are rounded from fractions, or by ``fix`` where there are many.
        """
        largest, gap = _exponent_range(inputs, bits)
        if not math.isfinite(largest):
            return False
        if gap == 0:  # a zero or a subnormal: the last bits of the nonzero inputs
            gap = min(_last_bit(tensor, bits) for tensor in inputs)
        error = self.bound * largest
        step = 2.0 ** (math.floor(math.log2(error)) + 2)  # E < step / 2 ≤ 2E
        grid = self.grid
        # below ``small`` a midpoint's last bit / L may be under step / 2 + E
        small = error * self.denominator * 2.0 ** (grid.precision + 4)
        # Results in the output's subnormal range are rounded on its fixed step (M's binade is
        # at least the smallest normal one) where C is a multiple of that step, small next to
        # its M, and the subnormal midpoints' last bit / L exceeds s/2 + E; else they are small.
        lowest = grid.emin - grid.precision  # the subnormal midpoints' last bit
        subnormals = (2.0 ** (lowest - 49) <= step <= 2.0 ** (lowest - 1)
                      and self.denominator * (step / 2 + error) < 2.0**lowest)
        if not subnormals:
            small = max(small, self.small_limit)
        floor = math.ceil(math.log2(2 * small))  # |written| ≥ 2^floor: |y| ≥ small
        if step / 2 + error >= gap / self.denominator or floor > grid.emax:
            return False
        # y + C − C with C = 1.5 · 2^52 · step rounds y to a multiple of step; adding
        # M = 1.5 · 2^(e + 53 − precision) (2^e: y's binade) in between rounds that, once and to
        # even, to the output grid (C is a multiple of the sum's last bit: it changes nothing)
        magic = 1.5 * step * 2.0**52
        scale = bits.view(torch.int64)
        torch.bitwise_and(y.view(torch.int64), _EXPONENT, out=scale)
        scale = scale.view(torch.float64)
        if subnormals:
            scale.clamp_min_(2.0**grid.emin)
        factor = 1.5 * 2.0 ** (53 - grid.precision)
        torch.add(y, magic, out=work).add_(scale, alpha=factor)
        work.sub_(scale, alpha=factor).sub_(magic)  # both exact: what is left is on the grid
        written.copy_(work)
        # A written +0 is exact where s/2 is a normal number of the output: x ≠ 0 is farther
        # than s/2 + E from 0, so its y rounds to a multiple of s ≠ 0. Then the sizes are
        # |bits| − 1, and a zero counts as the largest.
        sizes = bits.view(torch.int16)[: written.numel()]
        zeros = int(step / 2 >= self.small_limit)
        torch.sub(written.view(torch.int16), zeros, out=sizes).bitwise_and_(0x7FFF)
        limit = max(_bits_of_power(floor, grid), 1 - zeros) - zeros
        if int(sizes.amin()) < limit:  # rare: cancellation, subnormal outputs
            index = (sizes < limit).nonzero().view(-1)
            if index.numel() <= FEW:
                values = [t.index_select(0, index) for t in inputs]
                written[index] = torch.tensor(self._by_fractions(values), dtype=written.dtype,
                                              device=written.device)
            else:
                self.fix(written, Found(index, False, error, small), y, inputs)
        return True

    def _window(self, y: torch.Tensor, out: torch.Tensor, exact_ties: bool) -> torch.Tensor:
        """(tail − midpoint + W) mod 2^tail of y's bits, as the fraction of a float in [1, 2):
        0 … 2W is the window around the midpoint; with ``exact_ties``, XOR W and − 1 move the
        exact midpoint itself to the top of the range (3W covers the rest of the window)."""
        window = out.view(torch.int64)
        torch.add(y.view(torch.int64), self.offset, out=window)
        if exact_ties:
            window.bitwise_xor_(self.grid.window)
            torch.add(window, self.mask, out=window)  # − 1, modulo 2^tail (masked below)
        window.bitwise_and_(self.mask).bitwise_or_(_ONE)  # normal floats: no subnormal stalls
        return out

    def suspects(self, y: torch.Tensor, scratch: torch.Tensor, inputs: list[torch.Tensor],
                 written: torch.Tensor) -> Found | None:
        """The elements of ``y`` (float64) that need ``fix``; ``None`` if none.

        ``inputs`` are this slice's inputs, ``written`` its torch-cast result; ``scratch`` is a
        float64 buffer of ``y``'s size that may be overwritten.
        """
        if self.grid is None or y.numel() == 0:
            return None
        largest, gap = _exponent_range(inputs, scratch)
        if not math.isfinite(largest):
            return None  # inf/NaN inputs: refused by every caller
        error = self.bound * largest  # |float64 result − exact value| ≤ error
        # Below ``small`` the error may exceed the window: every such element is re-rounded.
        small = max(error * 2.0**53 / self.grid.window, self.small_limit)
        # A float64 value exactly on a midpoint μ is the exact value (an exact tie, which
        # torch's cast rounds to even, correctly) when nothing else comes that close: L(x − μ)
        # is a multiple of the inputs' and μ's last bits, so |x − μ| ≥ gap / L unless 0; μ's
        # last bit is ≥ small · 2^-(precision+1) outside the small elements.
        exact_ties = gap > 2 * error * self.denominator and small > error * self.tie_limit
        limit = self.limits[exact_ties]
        tiny = _smallest(written, scratch) < 2 * small  # |y| < small rounds below 2·small
        near = float(self._window(y, scratch, exact_ties).amin()) <= limit
        if not near and not tiny:
            return None
        flagged = scratch <= limit
        if tiny:
            flagged |= y.abs() < small
        return Found(flagged.nonzero().view(-1), exact_ties, error, small)

    def fix(self, written: torch.Tensor, found: Found, y: torch.Tensor,
            inputs: list[torch.Tensor]) -> None:
        """Write the correctly rounded θ at ``found.index`` of ``written`` (the output slice)."""
        index = found.index
        guess = y.index_select(0, index)
        finite = torch.isfinite(guess)
        if not bool(finite.all()):
            index, guess = index[finite], guess[finite]
        cell = _Cell(guess, self.grid)
        if found.exact_ties:  # within the error of μ means on μ; farther, the side is y's
            distance = cell.size - cell.mid
            up = torch.where(distance.abs() <= found.error, cell.odd(), distance > 0)
            results = cell.pick(up)
            rest = (cell.size < found.small).nonzero().view(-1)
            if rest.numel():
                results[rest] = self._exact(cell.part(rest), [t[index[rest]] for t in inputs])
        else:
            results = self._exact(cell, [t.index_select(0, index) for t in inputs])
        written[index] = results.to(written.dtype)

    def _exact(self, cell: _Cell, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The correctly rounded θ for these elements, from the exact sign of x − μ."""
        values = [t.double() for t in inputs]
        if len(cell.size) <= FEW:  # fewer operations than one element at a time
            return torch.tensor(self._by_fractions(values), dtype=torch.float64,
                                device=cell.size.device)
        size, mid, guess = cell.size, cell.mid, cell.guess
        error = values[0].abs()
        for value in values[1:]:
            torch.maximum(error, value.abs(), out=error)
        error.mul_(self.bound)
        order, known = _sign_of_sum(
            values, self.coefficients, mid.copysign(guess), self.denominator, self.split
        )
        order = torch.where(guess < 0, -order, order)  # |x| against μ: x has y's sign where
        usable = (error < cell.ulp / 4) & (error < size)  # the bound is below |y| (usable)
        known &= usable
        far = ~known & ((size - mid).abs() > error)  # the float64 value's side is x's side
        order = torch.where(far, torch.sign(size - mid).to(order.dtype), order)
        up = torch.where(order == 0, cell.odd(), order > 0)  # a tie goes to the even neighbour
        results = cell.pick(up)
        results.masked_fill_(error == 0, 0.0)  # every input is 0: an exact +0
        # undecided, or rounded to zero: the zero's sign is x's (+0 for an exact 0)
        rest = ((~known & ~far | (results == 0)) & (error > 0)).nonzero().view(-1)
        if rest.numel():
            results[rest] = torch.tensor(
                self._by_fractions([v[rest] for v in values]), dtype=torch.float64,
                device=results.device,
            )
        return results

    def _by_fractions(self, values: list[torch.Tensor]) -> list[float]:
        weights = self.weights
        return [
            round_fraction(sum(w * Fraction(v) for w, v in zip(weights, row, strict=True)),
                           self.grid)
            for row in zip(*(v.tolist() for v in values), strict=True)
        ]


_INTEGER = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_EXPONENT = 0x7FF0000000000000  # a float64's exponent field: its bits alone are 2^e


def _exponent_range(inputs: list[torch.Tensor], scratch: torch.Tensor) -> tuple[float, float]:
    """From the exponent fields of ``inputs``: a bound on every |element| (inf if one is
    inf/NaN), and the last bit of the smallest nonzero one (0 if one is 0 or subnormal)."""
    largest, gap = 0.0, math.inf
    for tensor in inputs:
        integer, fraction, field, bias = _fields(tensor.dtype)
        exponents = scratch.view(integer)[: tensor.numel()]
        torch.bitwise_and(tensor.view(integer), field, out=exponents)
        low, high = (v >> fraction for v in torch.stack(torch.aminmax(exponents)).tolist())
        if high == field >> fraction:
            return math.inf, 0.0
        largest = max(largest, 2.0 ** (high - bias + 1))
        gap = min(gap, 0.0 if low == 0 else 2.0 ** (low - bias - fraction))
    return largest, gap


@cache
def _fields(dtype: torch.dtype) -> tuple[torch.dtype, int, int, int]:
    """A float format's integer view, fraction bits, exponent field mask and bias."""
    info = torch.finfo(dtype)
    fraction = -round(math.log2(info.eps))
    field = ((1 << (info.bits - 1 - fraction)) - 1) << fraction
    return _INTEGER[info.bits // 8], fraction, field, (field >> fraction) >> 1


def _bits_of_power(exponent: int, grid: Grid) -> int:
    """The bits of 2^exponent in ``grid``'s format (0 below its smallest subnormal)."""
    if exponent >= grid.emin:
        return (exponent + grid.emax) << (grid.precision - 1)
    shift = exponent - (grid.emin - grid.precision + 1)
    return 1 << shift if shift >= 0 else 0


def _last_bit(tensor: torch.Tensor, scratch: torch.Tensor) -> float:
    """The smallest last bit among the nonzero elements of ``tensor`` (inf if all are 0)."""
    integer, fraction, _, bias = _fields(tensor.dtype)
    magnitude = torch.iinfo(integer).max
    sizes = scratch.view(integer)[: tensor.numel()]
    torch.sub(tensor.view(integer), 1, out=sizes).bitwise_and_(magnitude)  # ±0 → the largest
    low = int(sizes.amin()) + 1
    if low > magnitude:
        return math.inf
    return 2.0 ** (max(low >> fraction, 1) - bias - fraction)  # subnormals: the smallest step


def _smallest(written: torch.Tensor, scratch: torch.Tensor) -> float:
    """The smallest |element| of ``written`` (bf16/fp16/fp32), from its bits."""
    integer = _INTEGER[written.element_size()]
    sizes = scratch.view(integer)[: written.numel()]
    torch.bitwise_and(written.view(integer), torch.iinfo(integer).max, out=sizes)
    return abs(float(sizes.amin().view(written.dtype)))


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
