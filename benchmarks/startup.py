"""What the start-up hook adds to every Python process of the environment.

The plugin's ``mergekit_expo.pth`` runs at every interpreter start-up. The baseline is a venv made
here that sees the same packages (a path entry for this environment's site-packages) and runs the
same ``.pth`` files except ``mergekit_expo.pth``; the two interpreters then start in turn,
``python -c pass`` each, and the medians of the wall times are compared. ``-X importtime`` of the
plugged-in interpreter attributes the difference to modules.
"""

from __future__ import annotations

import os
import re
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

PLUGIN_PTH = "mergekit_expo.pth"


def baseline_venv(root: Path) -> str:
    """A venv with this environment's packages and .pth files, but not the plugin's .pth."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = str(root / "bin" / "python")
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )
    outer = Path(sysconfig.get_paths()["purelib"])
    for pth in outer.glob("*.pth"):
        if pth.name != PLUGIN_PTH:
            (site / pth.name).write_text(pth.read_text())
    # processed first (alphabetical order), so the copied .pth files find their modules
    (site / "00_outer_site_packages.pth").write_text(f"{outer}\n")
    return python


def start_time(python: str) -> tuple[float, float]:
    """(wall, CPU) seconds of one ``python -c pass``; CPU time suffers less from a busy machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([python, "-c", "pass"], capture_output=True, text=True, env=_env())
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode or result.stderr:  # a broken .pth prints and goes on: not a fair run
        raise SystemExit(f"{python} -c pass failed:\n{result.stderr[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return elapsed, cpu


def importtime_ms(python: str) -> dict[str, float]:
    """Cumulative ``-X importtime`` of the top-level imports made by ``site`` (ms)."""
    result = subprocess.run(
        [python, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True,
        env=_env(),
    )
    found = {}
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( +)(\S+)$", line)
        if match and len(match.group(2)) == 3:  # direct children of ``site``
            found[match.group(3)] = int(match.group(1)) / 1000
    return found


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MERGEKIT_EXPO_DISABLE"}


def main(runs: int, wait_quiet: float | None = None) -> str:
    from benchmarks.measure import machine_busy, wait_until_quiet

    if runs < 3:
        raise SystemExit("--runs must be at least 3")
    if wait_quiet is not None:
        wait_until_quiet(wait_quiet, timeout=900)
    if not (Path(sysconfig.get_paths()["purelib"]) / PLUGIN_PTH).exists():
        raise SystemExit(f"{PLUGIN_PTH} is not installed in this environment")
    with tempfile.TemporaryDirectory(prefix="expo-startup-") as tmp:
        bare = baseline_venv(Path(tmp) / "venv")
        plugged = sys.executable
        for python in (bare, plugged):  # warm the page cache and the .pyc files
            start_time(python)
        busy = machine_busy(1.0)
        times: dict[str, list[tuple[float, float]]] = {"plugged": [], "bare": []}
        for index in range(runs):
            pair = [("plugged", plugged), ("bare", bare)]
            for name, python in pair if index % 2 == 0 else pair[::-1]:
                times[name].append(start_time(python))
        startup = [importtime_ms(plugged).get("mergekit_expo._startup", 0.0) for _ in range(5)]

    def median_ms(name: str, which: int) -> float:
        return statistics.median(t[which] for t in times[name]) * 1000

    wall = [median_ms(name, 0) for name in ("bare", "plugged")]
    cpu = [median_ms(name, 1) for name in ("bare", "plugged")]
    return "\n".join(
        [
            f"python -c pass, {runs} interleaved runs each (median); "
            f"{busy:.1f} cores busy before the runs:",
            "                              wall      CPU",
            f"  without the plugin's .pth: {wall[0]:5.1f} ms  {cpu[0]:5.1f} ms",
            f"  with it:                   {wall[1]:5.1f} ms  {cpu[1]:5.1f} ms",
            f"  added by the start-up hook: {wall[1] - wall[0]:+.1f} ms wall, "
            f"{cpu[1] - cpu[0]:+.1f} ms CPU (target <= 3 ms)",
            "-X importtime, mergekit_expo._startup cumulative (median of 5): "
            f"{statistics.median(startup):.2f} ms",
        ]
    )
