"""Where the wall time of ``expo`` and ``task_arithmetic`` goes: ``python -m benchmarks breakdown``.

Runs ``scripts/phases.py`` (``mergekit-yaml`` with timers) for each method on the cached
checkpoints, interleaved and repeated, from a warm page cache, and prints the median phases.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from benchmarks.contenders import SCRIPTS, Models, build_rows
from benchmarks.measure import fsync_tree, run_measured, wait_until_quiet
from benchmarks.run import child_env, machine, source_state, warm_cache
from benchmarks.synthetic import build_family, shape_for

VARIANTS = {
    "expo": ("expo.yml", []),
    "task_arithmetic": ("task_arithmetic.yml", []),
}


def _phases(log: Path) -> dict:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("PHASES "):
            return json.loads(line[len("PHASES "):])
    raise RuntimeError(f"no PHASES line in {log}")


def main(params: float, cache: Path, results: Path, repeats: int, alpha: float,
         quiet_limit: float | None, flags: tuple[str, ...]) -> str:
    shape = shape_for(params)
    load_at_start = os.getloadavg()
    paths = build_family(cache, shape, count=1, shard_bytes=1_000_000_000)
    models = Models(sft=paths[0], iterates=paths[1:])
    work = results / "breakdown"
    build_rows(models, work, alpha=alpha, lam=0.0, include=set())  # writes the configs
    rows: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for repeat in range(repeats):
        for name, (config, extra) in VARIANTS.items():
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            if quiet_limit is not None:
                wait_until_quiet(quiet_limit, 600)
            warm_cache([models.sft, models.final])
            command = [sys.executable, str(SCRIPTS / "phases.py"), *extra,
                       str(work / "configs" / config), str(out), *flags]
            log = work / "logs" / f"{name.replace(' ', '_')}.{repeat}.log"
            measured = run_measured(command, log=log, env=child_env())
            if measured.returncode:
                raise RuntimeError(log.read_text()[-2000:])
            phases = _phases(log)
            fsync_tree(out)
            shutil.rmtree(out, ignore_errors=True)
            marks, totals = phases["marks"], phases["totals"]
            rows[name].append({
                "wall": measured.wall_s,
                "start-up + imports": marks["imports"],
                "merge method (kernel, checks)": totals.get("method", 0.0),
                "load (lazy safetensors)": totals.get("load", 0.0),
                "save (serialise + write)": totals.get("save", 0.0),
                "rest of run_merge": (marks["merge_end"] - marks["merge_start"])
                - totals.get("method", 0.0) - totals.get("load", 0.0) - totals.get("save", 0.0),
                "after run_merge (exit, shutdown)": measured.wall_s - marks["merge_end"],
                "background cores": measured.background_cores,
            })
    keys = list(next(iter(rows.values()))[0])
    lines = [
        f"Phases of one merge, {shape.parameters() / 1e9:.2f} B parameters, median of {repeats} "
        "(seconds)",
        "",
        "| phase | " + " | ".join(VARIANTS) + " |",
        "|---|" + "---:|" * len(VARIANTS),
    ]
    for key in keys:
        cells = [f"{statistics.median(r[key] for r in rows[name]):.2f}" for name in VARIANTS]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    session = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
        "machine": machine(),
        "source": source_state(),
        "load_at_start": load_at_start,
        "load_at_end": os.getloadavg(),
        "tag": f"{shape.parameters() / 1e9:.3g} B",
        "repeats": repeats,
        "rows": rows,
    }
    (work / "breakdown.json").write_text(json.dumps(session, indent=1))
    return text
