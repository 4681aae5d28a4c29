"""``mergekit-yaml`` with timers: where the wall time of one merge goes.

Usage: ``python phases.py CONFIG OUT [mergekit-yaml options]``. Prints one JSON line
(prefixed ``PHASES``) at exit with seconds since the process was created:

- ``interpreter``: Python is up (site, the mergekit-expo start-up hook);
- ``imports``: ``mergekit.scripts.run_yaml`` imported (torch, transformers, peft, mergekit);
- ``merge_start`` / ``merge_end``: ``run_merge``; inside it, summed over tensors: ``method``
  (the merge method's task: for expo the kernel and its checks), ``load`` (``LoadTensor``, lazy
  safetensors views), ``save`` (``TensorWriter._save_st``: safetensors serialisation and write);
- ``exit``: the last Python code ran (interpreter shutdown follows; the harness measures it).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path


def _created() -> float:
    """Process start time from /proc (seconds since the epoch)."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime")
    )
    return boot + start / ticks


CREATED = _created()
marks: dict[str, float] = {"interpreter": time.time() - CREATED}
totals: Counter = Counter()


def _timed(owner, name: str, label: str, edges: bool = False) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.time()
        if edges:
            marks[f"{label}_start"] = start - CREATED
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.time() - start
            if edges:
                marks[f"{label}_end"] = time.time() - CREATED

    setattr(owner, name, wrapper)


def _report() -> None:
    marks["exit"] = time.time() - CREATED
    print("PHASES " + json.dumps({"marks": marks, "totals": dict(totals)}), flush=True)


def main() -> None:
    if sys.argv[1:2] in (["--help"], ["-h"]):  # ours; the rest of the arguments are mergekit-yaml's
        print(__doc__)
        return
    from mergekit.scripts import run_yaml

    marks["imports"] = time.time() - CREATED
    import mergekit.io.tasks as io_tasks
    import mergekit.io.tensor_writer as tensor_writer
    import mergekit.merge_methods.task_adapter as task_adapter

    _timed(run_yaml, "run_merge", "merge", edges=True)
    _timed(task_adapter.ExecuteMergeMethodTask, "execute", "method")
    _timed(io_tasks.LoadTensor, "execute", "load")
    _timed(tensor_writer.TensorWriter, "_save_st", "save")
    atexit.register(_report)
    sys.argv[0] = "mergekit-yaml"
    run_yaml.main()


if __name__ == "__main__":
    main()
