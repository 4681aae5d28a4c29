"""What the output folder's staging costs an expo merge: staged vs in place, the same merge.

Both variants run mergekit's ``run_merge`` in this process on the same synthetic checkpoints,
in turn: "staged" is ``mergekit.merge.run_merge`` as the plugin wraps it (staging folder, checks,
move into place), "in place" is mergekit's own function underneath (``__wrapped__``).
Two cases: the output folder is new (deleted before each run, outside the timing), or it holds
the previous run's model, as when a merge is re-run.
"""

from __future__ import annotations

import inspect
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.synthetic import build_family, shape_for


def main(params: float, cache: Path, work: Path, repeats: int, wait_quiet: float | None) -> str:
    import mergekit.merge
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from benchmarks.measure import machine_busy, wait_until_quiet

    shape = shape_for(params)
    sft, dpo = build_family(cache, shape, count=1, shard_bytes=1 << 30)
    staged = mergekit.merge.run_merge
    in_place = inspect.unwrap(staged)
    if in_place is staged:
        raise SystemExit("mergekit.merge.run_merge is not wrapped: is mergekit-expo installed?")
    raw = {"merge_method": "expo", "base_model": str(sft), "models": [{"model": str(dpo)}],
           "parameters": {"alpha": 0.3}}
    options = MergeOptions(quiet=True, out_shard_size=500 * 1000**2, copy_tokenizer=True)
    if wait_quiet is not None:
        wait_until_quiet(wait_quiet, timeout=900)
    busy = machine_busy(1.0)
    times: dict[tuple[str, str], list[float]] = {}
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    in_place(MergeConfiguration.model_validate(raw), str(out), options=options)  # warm up
    try:
        for index in range(repeats):
            pair = [("staged", staged), ("in place", in_place)]
            for name, run_merge in pair if index % 2 == 0 else pair[::-1]:
                for case in ("new folder", "re-run"):
                    if case == "new folder":
                        shutil.rmtree(out, ignore_errors=True)
                    start = time.perf_counter()
                    run_merge(MergeConfiguration.model_validate(raw), str(out), options=options)
                    times.setdefault((case, name), []).append(time.perf_counter() - start)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    size = sum(p.stat().st_size for p in Path(dpo).glob("*.safetensors")) / 1e9
    lines = [
        f"expo merge, {shape.parameters() / 1e9:.3g} B parameters ({size:.2f} GB output), "
        f"{repeats} runs each in turn (median); {busy:.1f} cores busy before the runs:"
    ]
    for case in ("new folder", "re-run"):
        staged_s, in_place_s = (statistics.median(times[case, k]) for k in ("staged", "in place"))
        spread = {k: f"{min(times[case, k]):.2f}-{max(times[case, k]):.2f}"
                  for k in ("staged", "in place")}
        lines.append(
            f"  {case + ':':12} in place (mergekit alone) {in_place_s:.2f} s "
            f"[{spread['in place']}], staged {staged_s:.2f} s [{spread['staged']}]: "
            f"{staged_s - in_place_s:+.2f} s ({staged_s / in_place_s:.2f}x)"
        )
    return "\n".join(lines)
