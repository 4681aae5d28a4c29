"""The search's memory and per-candidate update time, and the 7 B regime.

``python -m benchmarks search-memory``: ``mergekit-expo search`` (2 candidates, λ ≠ 0) on
checkpoint families with T − 1 intermediates: peak private memory of the process tree against
one checkpoint's size, the per-candidate weight update (``update_seconds`` of ``results.jsonl``)
and the time to read the inputs once, next to each other.

``python -m benchmarks large``: Llama-7B-shaped bf16 checkpoints (≈ 13.5 GB each), where the
inputs no longer fit in the page cache next to the search's model: ``mergekit-yaml`` expo vs
task_arithmetic vs the I/O floor, then a search of 2 candidates. It refuses to start without the
free disk it needs, waits before each step until the machine has the memory it needs (other
people's work must not be pushed into the OOM killer), and removes everything it wrote, also when
it fails. ``--dry-run`` prints the plan and the checks without writing anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.contenders import SCRIPTS, Models, build_rows, tool
from benchmarks.measure import run_measured
from benchmarks.run import (
    Settings,
    _self_ignoring,
    child_env,
    machine,
    run_row,
    source_state,
    summarise,
    warm_cache,
)
from benchmarks.synthetic import CheckpointReader, build_family, shape_for

GB = 1e9
PROMPTS = [
    "The assistant answers the question",
    "User: how do I merge two models? Assistant:",
    "A helpful answer is",
    "Alignment moves the weights",
]
SCORER = '''"""Score = response length: the benchmark times the search, not a scorer."""


def score(prompt: str, response: str) -> float:
    return float(len(response))
'''
DISK_MARGIN = 2 * GB  # left free beyond what the benchmark writes


# -- the search, measured ------------------------------------------------------------------


def search_row(models: Models, work: Path, *, alphas: list[float], lam: float, prompts: int,
               tokens: int, warm: bool, interval: float = 0.1) -> dict:
    """Run ``mergekit-expo search`` as its own process and measure it."""
    work.mkdir(parents=True, exist_ok=True)
    config = {
        "merge_method": "expo",
        "base_model": str(models.sft.resolve()),
        "models": [{"model": str(p.resolve())} for p in models.iterates],
    }
    (work / "search.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
    (work / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)]}) + "\n" for i in range(prompts))
    )
    (work / "length_scorer.py").write_text(SCORER)
    out = work / "search"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        tool("mergekit-expo"), "search", str(work / "search.yml"), str(out),
        "--alpha", ",".join(map(str, alphas)), "--lambda", str(lam),
        "--prompts", str(work / "prompts.jsonl"),
        "--scorer", f"{work / 'length_scorer.py'}:score",
        "--max-new-tokens", str(tokens), "--batch-size", str(prompts), "--temperature", "0",
        "--no-progress",
    ]
    inputs = [models.sft, *models.iterates]
    read = warm_cache(inputs)  # the inputs read once, sequentially: the yardstick for an update
    if not warm:  # drop what can be dropped, so the search meets the inputs as a fresh start would
        _drop_cache(inputs)
    load_before = os.getloadavg()
    measured = run_measured(command, log=work / "search.log", env=child_env(), interval=interval)
    if measured.returncode != 0:
        raise RuntimeError(f"search failed:\n{(work / 'search.log').read_text()[-3000:]}")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    checkpoint = checkpoint_bytes(models.sft)
    updates = [row["update_seconds"] for row in rows]
    return {
        "intermediates": len(models.iterates) - 1,
        "T": len(models.iterates),
        "candidates": len(rows),
        "alphas": alphas,
        "lambda": lam,
        "prompts": prompts,
        "max_new_tokens": tokens,
        "checkpoint_bytes": checkpoint,
        "peak_private_bytes": measured.peak_private_bytes,
        "private_ratio": measured.peak_private_bytes / checkpoint,
        "peak_rss_bytes": measured.peak_rss_bytes,
        "wall_s": measured.wall_s,
        "cpu_s": measured.cpu_s,
        "update_seconds": updates,
        "update_median_s": statistics.median(updates),
        "candidate_seconds": [row["seconds"] for row in rows],
        "read_once_s": read["seconds"],
        "read_once_bytes": read["bytes"],
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "background_cores": measured.background_cores,
        "command": command,
    }


def read_phases(log: Path, wall: float) -> dict[str, float]:
    """Seconds per phase from a row's log: ``floor.py``'s line, or ``phases.py``'s JSON."""
    text = log.read_text(errors="replace") if log.exists() else ""
    floor = re.search(r"read [\d.]+ GB in ([\d.]+) s, write [\d.]+ GB in ([\d.]+) s, "
                      r"fsync ([\d.]+) s", text)
    if floor:
        return dict(zip(("read", "write", "fsync"), map(float, floor.groups()), strict=True))
    for line in text.splitlines():
        if line.startswith("PHASES "):
            data = json.loads(line[len("PHASES "):])
            marks, totals = data["marks"], data["totals"]
            merge = marks["merge_end"] - marks["merge_start"]
            method, load, save = (totals.get(k, 0.0) for k in ("method", "load", "save"))
            return {
                "start-up + imports": marks["imports"],
                "read (lazy safetensors)": load,
                "merge method": method,
                "write (serialise + write)": save,
                "rest of run_merge": merge - method - load - save,
                "exit": wall - marks["merge_end"],
            }
    return {}


def median_phases(records: list[dict]) -> dict[str, float]:
    keys = records[0].get("phases", {})
    return {k: statistics.median(r["phases"].get(k, 0.0) for r in records) for k in keys}


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in CheckpointReader(path).files())


def _drop_cache(paths: list[Path]) -> None:
    """Ask the kernel to forget the inputs' clean pages (POSIX_FADV_DONTNEED; no root needed)."""
    for model in paths:
        for shard in CheckpointReader(model).files():
            fd = os.open(shard, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def search_memory(params: float, intermediates: list[int], cache: Path, results: Path,
                  repeats: int) -> dict:
    """The search at T = k + 1 for each k intermediates, on one size: memory and update time."""
    shape = shape_for(params)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = results / stamp / "search-memory"
    for directory in (cache, results):
        directory.mkdir(parents=True, exist_ok=True)
        _self_ignoring(directory)
    session = _session_header(shape, {"intermediates": intermediates, "repeats": repeats})
    paths = build_family(cache, shape, count=max(intermediates) + 1, shard_bytes=1_000_000_000)
    runs: dict[int, list[dict]] = {k: [] for k in intermediates}
    for repeat in range(repeats):  # interleaved
        for k in intermediates:
            models = Models(sft=paths[0], iterates=[*paths[1:k + 1], paths[k + 1]])
            runs[k].append(search_row(models, work / f"k{k}.{repeat}", alphas=[0.3, 0.5],
                                      lam=0.5, prompts=2, tokens=4, warm=True))
    session["rows"] = [_median_row(runs[k]) for k in intermediates]
    return _finish(session, work, "search_memory.json")


def _median_row(runs: list[dict]) -> dict:
    row = dict(runs[0])
    for key in ("peak_private_bytes", "private_ratio", "peak_rss_bytes", "wall_s",
                "update_median_s", "read_once_s"):
        values = [r[key] for r in runs]
        row[key], row[key + "_min"], row[key + "_max"] = (
            statistics.median(values), min(values), max(values))
    row["repeats"] = len(runs)
    row["update_seconds"] = [u for r in runs for u in r["update_seconds"]]
    return row


# -- the 7 B regime --------------------------------------------------------------------------


def mem_available() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def wait_for_memory(need: float, *, poll: float = 30.0, timeout: float = 900.0,
                    log: Callable[[str], None] = print) -> float:
    """Wait until MemAvailable ≥ ``need`` bytes (polling), so as not to OOM other processes."""
    started = time.perf_counter()
    while (available := mem_available()) < need:
        waited = time.perf_counter() - started
        if waited > timeout:
            raise RuntimeError(
                f"MemAvailable stayed at {available / GB:.1f} GB < {need / GB:.1f} GB for "
                f"{waited:.0f} s: not starting a step that could push other processes out of memory"
            )
        log(f"waiting for memory: MemAvailable {available / GB:.1f} GB < {need / GB:.1f} GB "
            f"(waited {waited:.0f} s)")
        time.sleep(poll)
    waited = time.perf_counter() - started
    log(f"MemAvailable {available / GB:.1f} GB ≥ {need / GB:.1f} GB (waited {waited:.0f} s)")
    return waited


def plan_large(params: float, cache: Path) -> dict:
    """What the 7 B run will write and need, from the shape alone (nothing is read or written)."""
    shape = shape_for(params)
    checkpoint = shape.parameters() * 2
    family = cache / "large"
    existing = [p for p in (family.glob("*/*/.complete") if family.exists() else [])]
    to_write = max(0, 2 - len(existing)) * checkpoint + checkpoint  # inputs missing + 1 output
    cache.mkdir(parents=True, exist_ok=True)
    _self_ignoring(cache)  # never let `git add` near tens of GB of checkpoints
    free = shutil.disk_usage(cache).free
    return {
        "shape": shape.__dict__,
        "params": shape.parameters(),
        "checkpoint_bytes": checkpoint,
        "write_bytes": to_write,
        "disk_needed_bytes": to_write + DISK_MARGIN,
        "disk_free_bytes": free,
        "disk_ok": free >= to_write + DISK_MARGIN,
        "directory": str(family),
        "mem_available_bytes": mem_available(),
    }


def large(params: float, cache: Path, results: Path, repeats: int, min_available: float,
          flags: tuple[str, ...], prompts: int, tokens: int, verify: bool, keep: bool,
          log: Callable[[str], None] = print) -> dict:
    """Merge rows (floor, expo, task_arithmetic; interleaved) then the search, at ~7 B."""
    plan = plan_large(params, cache)
    if not plan["disk_ok"]:
        raise RuntimeError(
            f"not enough free disk under {cache}: the 7 B run writes "
            f"{plan['write_bytes'] / GB:.1f} GB (+ {DISK_MARGIN / GB:.0f} GB margin), "
            f"{plan['disk_free_bytes'] / GB:.1f} GB are free; free space or pass --cache-dir"
        )
    shape = shape_for(params)
    family = Path(plan["directory"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = results / stamp / "large"
    results.mkdir(parents=True, exist_ok=True)
    _self_ignoring(results)
    session = _session_header(shape, {
        "repeats": repeats, "flags": list(flags), "min_available_bytes": min_available,
        "prompts": prompts, "max_new_tokens": tokens, "verify": verify,
    })
    session["plan"] = plan
    waits: list[dict] = []
    # a kill (SIGTERM) becomes an exception, so that the cleanup below still runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def step(name: str) -> None:
        waits.append({"step": name, "waited_s": round(
            wait_for_memory(min_available, log=lambda m: log(f"[{name}] {m}")), 1)})

    try:
        step("build checkpoints")
        started = time.perf_counter()
        paths = build_family(family, shape, count=1, shard_bytes=2_000_000_000)
        session["build_s"] = round(time.perf_counter() - started, 1)
        models = Models(sft=paths[0], iterates=paths[1:])
        rows = build_rows(models, work, alpha=0.3, lam=0.0, flags=flags,
                          include={"floor", "expo", "task_arithmetic"}, extras=False)
        for row in rows:
            if not verify:
                row.check = None
            if row.key != "floor":  # mergekit-yaml with timers: where the time goes
                row.command = [sys.executable, str(SCRIPTS / "phases.py"), *row.command[1:]]
        settings = Settings(sizes=[params], cache=cache, results=results, repeats=repeats,
                            flags=flags, interval=0.1, warm=False)
        records: dict[str, list[dict]] = {row.key: [] for row in rows}
        for repeat in range(repeats):  # interleaved
            for row in rows:
                step(f"{row.key} #{repeat + 1}")
                log(f"running {row.key} #{repeat + 1}")
                record = run_row(row, work, settings, repeat)
                record["phases"] = read_phases(work / "logs" / f"{row.key}.{repeat}.log",
                                               record["wall_s"])
                records[row.key].append(record)
                log(f"  {row.key}: {record['wall_s']:.1f} s {record['phases']}")
        session["rows"] = [
            {"key": row.key, "label": row.label, "flags": list(row.flags),
             "command": row.command, **summarise(records[row.key]),
             "phases": median_phases(records[row.key])}
            for row in rows
        ]
        session["input_bytes"] = checkpoint_bytes(models.sft)
        _finish(session, work, "large.json")  # the merge rows are kept if the search fails
        step("search")
        log("running the search")
        session["search"] = search_row(models, work / "search", alphas=[0.3, 0.5], lam=0.0,
                                       prompts=prompts, tokens=tokens, warm=False)
    finally:
        session["memory_waits"] = waits
        if not keep:
            shutil.rmtree(family, ignore_errors=True)
            shutil.rmtree(work / "out", ignore_errors=True)
            log(f"removed {family} and the outputs")
    return _finish(session, work, "large.json")


# -- sessions ------------------------------------------------------------------------------


def _session_header(shape, settings: dict) -> dict:
    return {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
        "machine": machine(),
        "source": source_state(),
        "load_at_start": os.getloadavg(),
        "shape": shape.__dict__,
        "params": shape.parameters(),
        "settings": settings,
    }


def _finish(session: dict, work: Path, name: str) -> dict:
    session["load_at_end"] = os.getloadavg()
    session["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    work.mkdir(parents=True, exist_ok=True)
    out = work / name
    out.write_text(json.dumps(session, indent=1, default=str))
    session["results_file"] = str(out)
    return session
