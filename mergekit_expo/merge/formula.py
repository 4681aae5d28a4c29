"""The extrapolation formula on plain tensors, shared by the merge method and the α/λ search.

ExPO:                θ₂ = θ₁ + α(θ₁ − θ₀)
Iterative-DPO merge: θ  = −αθ₀ + (1+α)λθ̄ + (1+α)(1−λ)θ_T,   θ̄ = mean(θ₁…θ_{T−1})

Both are evaluated in delta form around a checkpoint, never as a sum of large products
(``(1+α)θ₁ − αθ₀`` cancels two big terms and loses ~1 % of bf16 elements):

    m = lerp(θ_T, θ̄, λ)  = θ_T + λ(θ̄ − θ_T)
    θ = lerp(m, θ₀, −α)  = m + α(m − θ₀)

in float64 and rounded once to the output dtype. float32 is not enough: α = 1.7 is not a float32
number, and its rounding alone flips results whose exact value is a bf16 rounding tie (bf16
deltas are short dyadic numbers, so ties are common); float64 lands on the tie and rounds it as
the exact formula does.

Speed: one pass over the inputs in cache-sized slices through float64 scratch buffers that each
thread allocates once and reuses. Large CPU tensors are split between worker threads whose own
torch thread count is 1, so every op runs on its worker without an OpenMP region (torch releases
the GIL inside each op): thousands of short OpenMP regions per tensor stall whenever another
process competes for the cores. Only same-dtype vectorised kernels are used (mixed-dtype
arithmetic takes torch's slow scalar path). ``extrapolate_checked`` also reports, from the same
pass, whether the result is finite. ``python -m benchmarks kernel`` compares this kernel with
float32 and ``torch.lerp``."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from mergekit_expo.merge.native import Native
from mergekit_expo.merge.rounding import Rounding

# Elements per slice: the float64 scratch (2-3 slices of 1 MiB) stays in a core's L2 cache, and
# the Python overhead per slice (~10 µs) is ~5 % of its arithmetic.
CHUNK_ELEMENTS = 1 << 17
# On accelerators one launch per op should cover much more: 16 M elements (128 MB of float64).
DEVICE_CHUNK_ELEMENTS = 1 << 24
# CPU tensors with fewer elements than this are not split between threads.
SPLIT_ELEMENTS = 1 << 20

# Process-wide on purpose: scratch buffers are allocated once per thread and reused for every
# tensor, and the worker threads are started once; per call they would cost more than the math.
_scratch = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def extrapolate(
    reference: torch.Tensor, final: torch.Tensor, intermediates: Sequence[torch.Tensor] = (),
    *, alpha: float, lam: float = 0.0, out: torch.Tensor | None = None,
    mean_of: int | None = None,
) -> torch.Tensor:
    """Return θ for one tensor; ``out`` (same shape, any float dtype) receives it in place.

    ``intermediates`` are ignored when ``lam == 0`` (pure ExPO on ``final``). ``mean_of``: θ̄ is
    the sum of ``intermediates`` over this count (default: their number), for a caller that
    holds intermediates already summed (exactly) into fewer tensors.
    """
    return extrapolate_checked(
        reference, final, intermediates, alpha=alpha, lam=lam, out=out, check=False,
        mean_of=mean_of,
    )[0]


def extrapolate_checked(
    reference: torch.Tensor, final: torch.Tensor, intermediates: Sequence[torch.Tensor] = (),
    *, alpha: float, lam: float = 0.0, out: torch.Tensor | None = None, check: bool = True,
    mean_of: int | None = None,
) -> tuple[torch.Tensor, bool]:
    """``extrapolate`` plus whether the result is finite, found in the same pass.

    The flag is ``True`` if every element of the result is finite in ``out``'s dtype (always
    ``True`` with ``check=False``). The check is a min/max reduction over each written slice
    while it is in cache, instead of a separate ``isfinite`` pass over the whole output.
    """
    if out is None:
        out = torch.empty_like(final, memory_format=torch.contiguous_format)
    if lam and not intermediates:
        raise ValueError("lambda != 0 needs at least one intermediate checkpoint")
    intermediates = tuple(intermediates) if lam else ()
    for tensor in (reference, *intermediates):
        if tensor.shape != final.shape:
            raise ValueError(f"shape mismatch: {tuple(tensor.shape)} vs {tuple(final.shape)}")
    if out.shape != final.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(final.shape)}")

    inputs = [_flat(t) for t in (final, reference, *intermediates)]
    target = (
        out.view(-1)
        if out.is_contiguous()
        else torch.empty(out.numel(), dtype=out.dtype, device=out.device)
    )
    total = target.numel()
    mean_of = mean_of or len(intermediates)
    rounding = Rounding(alpha, lam, inputs, out.dtype, mean_of)
    native = Native(rounding.coefficients, rounding.denominator, inputs, out.dtype)
    run = _run_native if native.usable else _run
    extra = native if native.usable else rounding
    workers = _workers(total, final.device)
    if workers == 1:
        finite = run(inputs, target, 0, total, alpha, lam, check, extra, mean_of)
    else:
        step = -(-total // workers)
        step = -(-step // CHUNK_ELEMENTS) * CHUNK_ELEMENTS  # whole slices per worker
        pool = _get_pool(workers)
        jobs = [
            pool.submit(
                run, inputs, target, start, min(total, start + step), alpha, lam, check,
                extra, mean_of,
            )
            for start in range(0, total, step)
        ]
        finite = all([job.result() for job in jobs])
    if target.data_ptr() != out.data_ptr():
        out.copy_(target.view(out.shape))
    return out, finite


def _run(
    inputs: list[torch.Tensor],
    target: torch.Tensor,
    begin: int,
    end: int,
    alpha: float,
    lam: float,
    check: bool,
    rounding: Rounding,
    mean_of: int,
) -> bool:
    """Compute ``target[begin:end]`` slice by slice; return whether it is all finite."""
    if begin >= end:
        return True
    chunk = _chunk(target.device)
    count = -(-(end - begin) // chunk)
    extremes = torch.empty(2 * count, dtype=target.dtype, device=target.device) if check else None
    snaps = rounding.snaps
    for index, start in enumerate(range(begin, end, chunk)):
        stop = min(end, start + chunk)
        slices = [t[start:stop] for t in inputs]
        block, spare, third = _block(slices, alpha, lam, stop - start, target.device, mean_of)
        written = target[start:stop]
        if not (snaps and rounding.snap(block, written, slices, spare, third)):
            written.copy_(block)
            found = rounding.suspects(block, spare, slices, written)
            if found is not None:  # near a rounding boundary: round the exact value once
                rounding.fix(written, found, block, slices)
        if check:  # inf after rounding to the output dtype, or NaN, shows in the min or the max
            torch.aminmax(written, out=(extremes[2 * index], extremes[2 * index + 1]))
    return bool(torch.isfinite(extremes).all()) if check else True


def _run_native(
    inputs: list[torch.Tensor], target: torch.Tensor, begin: int, end: int, alpha: float,
    lam: float, check: bool, native: Native, mean_of: int,
) -> bool:
    """``_run`` by the compiled kernel (same arguments; it checks finiteness as it writes)."""
    if begin >= end:
        return True
    return native.run(inputs, target, begin, end) or not check


def _chunk(device: torch.device) -> int:
    return CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS


def _workers(total: int, device: torch.device) -> int:
    if device.type != "cpu" or total < SPLIT_ELEMENTS:
        return 1
    return max(1, min(torch.get_num_threads(), total // SPLIT_ELEMENTS))


def _serial_worker() -> None:
    """Pool initializer: this thread's torch ops run without OpenMP (thread-local setting)."""
    torch.get_num_threads()  # torch's one-time per-thread init, before the override below
    torch.set_num_threads(1)


def _get_pool(workers: int) -> ThreadPoolExecutor:
    """The kernel's worker threads, created once (again only if more are needed)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(
                workers, thread_name_prefix="expo-kernel", initializer=_serial_worker
            )
            barrier = threading.Barrier(workers)
            for job in [pool.submit(barrier.wait) for _ in range(workers)]:
                job.result()  # every worker exists and has run its initializer
            # set_num_threads(1) also changed the default that torch gives threads created
            # later; put it back (this thread's own setting is unchanged by this call).
            torch.set_num_threads(threads)
            _pool, _pool_size = pool, workers
        return _pool


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)


def _buffers(device: torch.device, count: int) -> list[torch.Tensor]:
    """``count`` float64 scratch slices for this thread and device, allocated once."""
    size = _chunk(device)
    key = (str(device), count, size)
    cache = getattr(_scratch, "buffers", None)
    if cache is None:
        cache = _scratch.buffers = {}
    buffers = cache.get(key)
    if buffers is None:
        buffers = cache[key] = [
            torch.empty(size, dtype=torch.float64, device=device) for _ in range(count)
        ]
    return buffers


def _block(
    slices: list[torch.Tensor], alpha: float, lam: float, size: int, device: torch.device,
    mean_of: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """θ for one flat slice in float64 scratch, and two spare scratch slices of the same size
    (all valid until the next call on this thread); θ̄ = Σ intermediates / ``mean_of``."""
    final, reference, *intermediates = slices
    merged, other, rest = (b[:size] for b in _buffers(device, 3))
    merged.copy_(final)
    if lam:
        other.copy_(intermediates[0])
        for tensor in intermediates[1:]:
            rest.copy_(tensor)
            other.add_(rest)
        if mean_of > 1:
            other.div_(mean_of)
        merged.lerp_(other, lam)
    other.copy_(reference)
    return merged.lerp_(other, -alpha), other, rest
