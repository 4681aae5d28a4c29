"""What ``mergekit-expo check`` costs on the demo's models, beside the imports it cannot skip.

``check`` reads the config as every expo merge does, with mergekit's own ``MergeConfiguration``
(``mergekit.config``). That module imports ``mergekit.common``, which imports torch, transformers'
model classes (its ``AutoClassProtocol`` annotations name ``transformers.PreTrainedModel``) and
peft at its top: importing ``mergekit.config`` is the floor of any process that reads a mergekit
config. The benchmark builds the demo's checkpoints and ``expo.yml`` in a temporary folder and
starts, in turn, ``mergekit-expo check expo.yml OUT`` and a Python process that imports the
floor's parts one after the other, ending with ``mergekit.config`` itself, and times each part
(``time.process_time``; its exit is the rest of its CPU time). That process imports the same
modules as ``python -c 'import mergekit.config'``, so its CPU time is the floor; the CPU medians
show what the check adds to its floor and what the floor is made of.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOOR_IMPORTS = "import mergekit.config"
# the floor's parts, imported in this order in one process: (label, statements)
FLOOR_PARTS = (
    ("torch", "import torch"),
    ("transformers and its configuration classes",
     "import transformers; from transformers import AutoConfig, PretrainedConfig"),
    ("transformers' model classes (transformers.modeling_utils)",
     "import transformers.modeling_utils"),
    ("peft", "import peft"),
    ("the rest of mergekit.common, mergekit.config", FLOOR_IMPORTS),
)
PARTS_SCRIPT = "\n".join([
    "import json, time",
    "marks = [('interpreter start-up', time.process_time())]",
    *(f"{code}\nmarks.append(({label!r}, time.process_time()))" for label, code in FLOOR_PARTS),
    "print(json.dumps(marks))",
])


def _cpu_run(command: list[str]) -> tuple[float, float, str]:
    """(wall, CPU, stdout) of one process; CPU time suffers less from a busy machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{(done.stdout + done.stderr)[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return elapsed, cpu, done.stdout


def _check_command() -> str:
    beside = Path(sys.executable).parent / "mergekit-expo"
    found = str(beside) if beside.exists() else shutil.which("mergekit-expo")
    if found is None:
        raise SystemExit("mergekit-expo is not installed in this environment")
    return found


def _parts(runs: list[tuple[float, float, str]]) -> list[tuple[str, float]]:
    """(label, median CPU seconds) of each part, from the parts processes' marks; the last
    part is the interpreter's exit (its CPU time less its last mark)."""
    marks = [json.loads(stdout.strip().splitlines()[-1]) + [["interpreter exit", cpu]]
             for _, cpu, stdout in runs]
    parts = []
    for index, (label, _) in enumerate(marks[0]):
        steps = [run[index][1] - (run[index - 1][1] if index else 0.0) for run in marks]
        parts.append((label, statistics.median(steps)))
    return parts


def main(runs: int, wait_quiet: float | None = None) -> str:
    from benchmarks.measure import machine_busy, wait_until_quiet
    from mergekit_expo.demo.run import build_inputs

    if runs < 1:
        raise SystemExit("--runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="expo-check-") as tmp:
        _, _, config = build_inputs(Path(tmp) / "demo")
        commands = {
            "check": [_check_command(), "check", str(config), str(Path(tmp) / "out2")],
            "parts": [sys.executable, "-c", PARTS_SCRIPT],
        }
        if wait_quiet is not None:
            wait_until_quiet(wait_quiet, timeout=900)
        busy = machine_busy(1.0)
        times: dict[str, list[tuple[float, float, str]]] = {name: [] for name in commands}
        for index in range(runs):
            order = list(commands) if index % 2 == 0 else list(reversed(commands))
            for name in order:
                times[name].append(_cpu_run(commands[name]))

    def median(name: str, which: int) -> float:
        return statistics.median(t[which] for t in times[name])

    check_cpu, floor_cpu = median("check", 1), median("parts", 1)
    parts = _parts(times["parts"])
    width = max(len(label) for label, _ in parts)
    return "\n".join([
        f"mergekit-expo check on the demo's models, {runs} interleaved runs each (median); "
        f"{busy:.1f} cores busy before the runs:",
        "                                     wall      CPU",
        f"  mergekit-expo check expo.yml OUT: {median('check', 0):5.2f} s  {check_cpu:5.2f} s",
        f"  its imports alone:                {median('parts', 0):5.2f} s  {floor_cpu:5.2f} s",
        f"  (python -c '{FLOOR_IMPORTS}', mergekit's reader of the config, in parts: below)",
        f"  the check beyond its imports: {check_cpu - floor_cpu:+.2f} s CPU",
        "Its imports, part by part (CPU, the process above importing them in this order, median):",
        *(f"  {label:<{width}}  {seconds:5.2f} s" for label, seconds in parts),
    ])
