"""Per-tensor kernels: speed, and agreement with the float64 formula over the α and λ grid.

Candidates, all producing bf16 from bf16 inputs:
- ``expo``: ``mergekit_expo.merge.formula.extrapolate`` (float64 slices, reused scratch);
- ``expo, float32 slices``: the same loop with float32 scratch;
- ``torch.lerp bf16``: ``torch.lerp(θ₁, θ₀, −α)`` (float32 inside, one rounding; fastest);
- ``float64, whole tensor``: ``(θ₁ + α(θ₁ − θ₀))`` on freshly allocated float64 tensors;
- ``mergekit task_arithmetic``, ``mergekit expo``: the methods through ``merge_tensors``;
- ``isfinite(out).all()``: the finiteness check ``checks.check_finite`` runs on every result.

Speed is reported as ns per element (wall time; all torch threads), agreement on realistic
bf16 pairs (SFT weights N(0, 0.02²), deltas 2–4 % of them).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from reference import formula64  # noqa: E402  (the float64 reference shared with the tests)

ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 1.7, 2.5, 10.0, 25.0)
LAMBDAS = (0.0, 0.2, 0.3)


def _pair(elements: int, seed: int, count: int = 1, step: float = 0.02):
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, elements // 2048)
    theta0 = (torch.randn(rows, 2048, generator=generator) * 0.02).to(torch.bfloat16)
    chain = [theta0]
    for _ in range(count):
        noise = torch.randn(rows, 2048, generator=generator) * 0.02 * step
        chain.append((chain[-1].float() + noise).to(torch.bfloat16))
    return chain


def _float32_slices(theta0, final, alpha):
    from mergekit_expo.merge import formula as extrapolation

    out = torch.empty_like(final)
    a = torch.empty(extrapolation.CHUNK_ELEMENTS, dtype=torch.float32)
    b = torch.empty_like(a)
    f, r, o = final.view(-1), theta0.view(-1), out.view(-1)
    for start in range(0, f.numel(), a.numel()):
        stop = min(f.numel(), start + a.numel())
        x, y = a[: stop - start], b[: stop - start]
        x.copy_(f[start:stop])
        y.copy_(r[start:stop])
        o[start:stop].copy_(x.lerp_(y, -alpha))
    return out


def candidates():
    from mergekit.merge_methods import merge_tensors

    from mergekit_expo.merge.formula import extrapolate

    return {
        "expo (float64 slices, reused scratch)": lambda t0, t1, a: extrapolate(t0, t1, alpha=a),
        "float32 slices": _float32_slices,
        "torch.lerp on bf16": lambda t0, t1, a: torch.lerp(t1, t0, -a),
        "float64, whole tensor": lambda t0, t1, a: (
            t1.double() + a * (t1.double() - t0.double())
        ).to(torch.bfloat16),
        "mergekit task_arithmetic (bf16)": lambda t0, t1, a: merge_tensors(
            [t0, t1], "task_arithmetic", base_index=0, parameters={"weight": 1 + a}
        ),
        "mergekit expo (kernel + checks)": lambda t0, t1, a: merge_tensors(
            [t0, t1], "expo", base_index=0, parameters={"alpha": a}
        ),
    }


def _time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(elements: int, threads: int | None, agreement_elements: int = 1 << 22) -> None:
    from mergekit_expo.merge.formula import extrapolate

    if threads:
        torch.set_num_threads(threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    theta0, theta1 = _pair(elements, seed=0, step=0.035)
    n = theta1.numel()
    print(f"\nspeed on {n / 1e6:.0f} M elements (best of 5, ns per element):")
    for name, fn in candidates().items():
        seconds = _time(lambda fn=fn: fn(theta0, theta1, 1.7))
        print(f"  {name:42s} {seconds / n * 1e9:6.2f} ns")
    out = extrapolate(theta0, theta1, alpha=1.7)
    seconds = _time(lambda: bool(torch.isfinite(out).all()))
    print(f"  {'isfinite(out).all() (checks.check_finite)':42s} {seconds / n * 1e9:6.2f} ns")

    print("\nshare of elements that differ from float64 rounded to bf16 "
          f"({agreement_elements / 1e6:.2g} M elements):")
    small = _pair(agreement_elements, seed=1, count=3, step=0.02)
    names = ["expo (float64 slices, reused scratch)", "float32 slices", "torch.lerp on bf16"]
    fns = candidates()
    print(f"  {'α':>5} {'λ':>4}  " + "  ".join(f"{n[:24]:>24}" for n in names))
    worst = {}
    for lam in LAMBDAS:
        for alpha in ALPHAS:
            theta0s, *rest = small
            final, between = rest[-1], rest[:-1]
            expected = formula64(theta0s, final, between, alpha=alpha, lam=lam).to(torch.bfloat16)
            cells = []
            for name in names:
                if lam:
                    if name.startswith("expo"):
                        got = extrapolate(theta0s, final, between, alpha=alpha, lam=lam)
                    else:  # float32 m = lerp(θ_T, θ̄, λ), then the candidate on (θ₀, m)
                        mean = torch.stack([x.float() for x in between]).mean(0)
                        m = torch.lerp(final.float(), mean, lam)
                        got = torch.lerp(m, theta0s.float(), -alpha).to(torch.bfloat16)
                else:
                    got = fns[name](theta0s, final, alpha)
                miss = float((got != expected).double().mean())
                worst[name] = max(worst.get(name, 0.0), miss)
                cells.append(f"{miss * 100:23.4f}%")
            print(f"  {alpha:5g} {lam:4g}  " + "  ".join(cells))
    print("  worst: " + ", ".join(f"{k}: {v * 100:.4f} %" for k, v in worst.items()))


RATIO_CASES = (  # (α, λ): ExPO with a decimal α, a dyadic one (many exact ties), the λ merge
    (0.3, 0.0), (0.5, 0.0), (1.7, 0.0), (0.4, 0.3),
)


def ratio(elements: int, repeats: int = 5) -> str:
    """Median time of today's kernels over the one before issue 20, interleaved, per case: the
    compiled kernel (what a CPU merge uses where a C compiler is found) and the torch kernel
    (``MERGEKIT_EXPO_KERNEL=torch``: no compiler, GPU tensors)."""
    import os
    import statistics

    from benchmarks.baseline import BEFORE_EXACT_ROUNDING, old_formula
    from mergekit_expo.merge import native
    from mergekit_expo.merge.formula import extrapolate

    old = old_formula()
    compiled = native.library() is not None

    def torch_kernel(*args, **kwargs):
        os.environ[native.ENV] = "torch"
        try:
            return extrapolate(*args, **kwargs)
        finally:
            del os.environ[native.ENV]

    theta0, *chain = _pair(elements, seed=0, count=3, step=0.035)
    # one thread (OMP_NUM_THREADS=1): both kernels run on the calling thread, whose CPU time
    # is what other processes on a busy machine disturb least; else wall time
    threads = torch.get_num_threads()
    clock, kind = (time.thread_time, "CPU time") if threads == 1 else (time.perf_counter, "wall")
    kernels = {"old": old.extrapolate, "torch": torch_kernel}
    if compiled:
        kernels["compiled"] = extrapolate
    lines = [f"torch {torch.__version__}, {threads} threads, {theta0.numel() / 1e6:.0f} M bf16 "
             f"elements; medians of {repeats} ({kind}), interleaved; ns per element",
             f"{'α':>5} {'λ':>4} {'before ' + BEFORE_EXACT_ROUNDING:>15} "
             + (f"{'compiled':>9} {'ratio':>6} " if compiled else "")
             + f"{'torch':>7} {'ratio':>6}"]
    ratios = []
    for alpha, lam in RATIO_CASES:
        mids = chain[:-1] if lam else ()
        times = {name: [] for name in kernels}
        for fn in kernels.values():  # warm-up: scratch buffers, worker threads, the build
            fn(theta0, chain[-1], mids, alpha=alpha, lam=lam)
        for _ in range(repeats):
            for name, fn in kernels.items():
                start = clock()
                fn(theta0, chain[-1], mids, alpha=alpha, lam=lam)
                times[name].append(clock() - start)
        n = theta0.numel()
        medians = {name: statistics.median(t) / n * 1e9 for name, t in times.items()}
        ratios.append(medians["compiled" if compiled else "torch"] / medians["old"])
        row = f"{alpha:5g} {lam:4g} {medians['old']:12.2f} ns "
        if compiled:
            row += f"{medians['compiled']:6.2f} ns {medians['compiled'] / medians['old']:6.2f} "
        row += f"{medians['torch']:4.2f} ns {medians['torch'] / medians['old']:6.2f}"
        lines.append(row)
    if not compiled:
        lines.append("(no compiled kernel here: no C compiler, or its build failed)")
    lines.append(f"median ratio over the cases ({'compiled' if compiled else 'torch'}): "
                 f"{statistics.median(ratios):.2f}")
    return "\n".join(lines)
