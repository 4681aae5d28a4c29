"""Check a merged checkpoint against the float64 formula, tensor by tensor, in bounded memory.

Agreement is the share of output elements equal to the float64 value of the formula rounded to
the output dtype (``torch``'s rounding, as in ``tests/reference.py``). The formula is written as
the papers write it, independently of the kernel:

    θ = −αθ₀ + (1+α)λθ̄ + (1+α)(1−λ)θ_T      (λ = 0: θ_T + α(θ_T − θ₀))
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.synthetic import CheckpointReader

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from reference import formula64  # noqa: E402  (the one float64 reference, shared with the tests)

ROWS_ELEMENTS = 1 << 22  # compare in slices of about this many elements


@dataclass
class Agreement:
    elements: int
    mismatches: int
    max_abs_error: float
    missing: list[str]
    unexpected: list[str]
    wrong_dtype: list[str]

    @property
    def share(self) -> float:
        return 1.0 - self.mismatches / self.elements if self.elements else 0.0

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_dtype)

    def as_dict(self) -> dict:
        return {**asdict(self), "share": self.share, "complete": self.complete}


def check_output(
    output: Path,
    reference: Path,
    final: Path,
    intermediates: Sequence[Path] = (),
    *,
    alpha: float,
    lam: float = 0.0,
) -> Agreement:
    """Compare every tensor of ``output`` with the formula on the input checkpoints."""
    out = CheckpointReader(output)
    inputs = [CheckpointReader(p) for p in (reference, final, *intermediates)]
    expected_names = set(inputs[1].names())
    names = set(out.names())
    result = Agreement(
        elements=0,
        mismatches=0,
        max_abs_error=0.0,
        missing=sorted(expected_names - names),
        unexpected=sorted(names - expected_names),
        wrong_dtype=[],
    )
    for name in sorted(names & expected_names):
        actual = out.get(name)
        theta0, theta_t, *between = (reader.get(name) for reader in inputs)
        if actual.dtype != theta_t.dtype or actual.shape != theta_t.shape:
            result.wrong_dtype.append(f"{name}: {actual.dtype} {tuple(actual.shape)}")
            continue
        flat = [t.reshape(-1) for t in (actual, theta0, theta_t, *between)]
        for start in range(0, flat[0].numel(), ROWS_ELEMENTS):
            part = [t[start : start + ROWS_ELEMENTS] for t in flat]
            expected = formula64(part[1], part[2], part[3:], alpha=alpha, lam=lam)
            rounded = expected.to(actual.dtype)
            wrong = part[0] != rounded
            result.elements += part[0].numel()
            result.mismatches += int(wrong.sum())
            error = (part[0].double() - expected).abs().max()
            result.max_abs_error = max(result.max_abs_error, float(error))
    return result
