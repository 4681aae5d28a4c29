"""What ``mergekit-expo check`` costs on the demo's models, beside the imports it cannot skip.

``check`` runs mergekit's own planner on the config, so it imports what a merge imports to plan
(``mergekit.merge``, ``mergekit.plan``; they pull in torch, transformers and peft through
``mergekit.common``). The benchmark builds the demo's checkpoints and ``expo.yml`` in a temporary
folder and starts, in turn, ``mergekit-expo check expo.yml OUT`` and a Python process that only
imports those modules; the CPU medians show what the check adds to that floor.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR_IMPORTS = "import mergekit.merge, mergekit.plan, mergekit.options"


def _cpu_run(command: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one process; CPU time suffers less from a busy machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-2000:]}")
    return elapsed, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def _check_command() -> str:
    beside = Path(sys.executable).parent / "mergekit-expo"
    found = str(beside) if beside.exists() else shutil.which("mergekit-expo")
    if found is None:
        raise SystemExit("mergekit-expo is not installed in this environment")
    return found


def main(runs: int, wait_quiet: float | None = None) -> str:
    from benchmarks.measure import machine_busy, wait_until_quiet
    from mergekit_expo.demo.run import build_inputs

    if runs < 1:
        raise SystemExit("--runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="expo-check-") as tmp:
        _, _, config = build_inputs(Path(tmp) / "demo")
        commands = {
            "check": [_check_command(), "check", str(config), str(Path(tmp) / "out2")],
            "floor": [sys.executable, "-c", FLOOR_IMPORTS],
        }
        if wait_quiet is not None:
            wait_until_quiet(wait_quiet, timeout=900)
        busy = machine_busy(1.0)
        times: dict[str, list[tuple[float, float]]] = {"check": [], "floor": []}
        for index in range(runs):
            order = ["check", "floor"] if index % 2 == 0 else ["floor", "check"]
            for name in order:
                times[name].append(_cpu_run(commands[name]))

    def median(name: str, which: int) -> float:
        return statistics.median(t[which] for t in times[name])

    check_cpu, floor_cpu = median("check", 1), median("floor", 1)
    return "\n".join([
        f"mergekit-expo check on the demo's models, {runs} interleaved runs each (median); "
        f"{busy:.1f} cores busy before the runs:",
        "                                     wall      CPU",
        f"  mergekit-expo check expo.yml OUT: {median('check', 0):5.2f} s  {check_cpu:5.2f} s",
        f"  its imports alone:                {median('floor', 0):5.2f} s  {floor_cpu:5.2f} s",
        f"  (python -c '{FLOOR_IMPORTS}')",
        f"  the check beyond its imports: {check_cpu - floor_cpu:+.2f} s CPU",
    ])
