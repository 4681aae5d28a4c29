"""One benchmark session: build or reuse checkpoints, run each row as a process, check outputs."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from benchmarks.contenders import LOW_MEMORY_FLAGS, Models, Row, build_rows
from benchmarks.measure import fsync_tree, run_measured, wait_until_quiet
from benchmarks.synthetic import TINY, CheckpointReader, Shape, build_family, shape_for
from benchmarks.verify import check_output

# Rows run at every additional size (requirement: memory does not grow with model size).
SCALING_ROWS = {
    "floor", "expo", "task_arithmetic", "inram", "expo_lowmem", "ta_lowmem",
}


@dataclass
class Settings:
    sizes: list[float]
    cache: Path
    results: Path
    alpha: float = 0.3
    lam: float = 0.3
    iterates: int = 3
    shard_bytes: int = 1_000_000_000
    repeats: int = 1
    flags: tuple[str, ...] = ()
    low_memory_flags: tuple[str, ...] = LOW_MEMORY_FLAGS
    include: set[str] | None = None
    flag_sweep: bool = False
    extras: bool = True
    quick: bool = False
    keep_outputs: bool = False
    seed: int = 0
    interval: float = 0.02
    quiet_limit: float | None = None  # wait until other processes use fewer cores than this
    quiet_timeout: float = 900.0
    warm: bool = True  # read the inputs right before each run (False where they cannot fit)
    shapes: list[Shape] = field(default_factory=list)

    def shape(self, params: float) -> Shape:
        return TINY if self.quick else shape_for(params)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def machine() -> dict:
    import psutil
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for package in ("mergekit", "transformers", "safetensors", "mergekit-expo"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:  # noqa: BLE001
            info[package] = "?"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def warm_cache(paths: list[Path]) -> dict:
    """Read every shard once so that all rows start from the same (warm) page cache.

    Done right before each run: some virtual machines (this one: DAMON ``pageout`` of page-cache
    regions idle for ~30 s) evict cold file pages long before memory is short.
    """
    buffer = memoryview(bytearray(64 << 20))
    start, total = time.perf_counter(), 0
    for model in paths:
        for shard in CheckpointReader(model).files():
            with open(shard, "rb", buffering=0) as handle:
                while count := handle.readinto(buffer):
                    total += count
    return {"bytes": total, "seconds": round(time.perf_counter() - start, 3)}


def _remove(row: Row) -> None:
    for path in row.paths:
        shutil.rmtree(path, ignore_errors=True)


def run_row(row: Row, work: Path, settings: Settings, repeat: int) -> dict:
    _remove(row)
    waited, busy = (0.0, None)
    if settings.quiet_limit is not None:
        waited, busy = wait_until_quiet(settings.quiet_limit, settings.quiet_timeout)
    warm = warm_cache(row.inputs) if settings.warm else None
    load_before = os.getloadavg()
    measurement = run_measured(
        row.command,
        log=work / "logs" / f"{row.key}.{repeat}.log",
        env=child_env(),
        interval=settings.interval,
    )
    load_after = os.getloadavg()
    record = {
        "key": row.key,
        "repeat": repeat,
        **{k: v for k, v in measurement.as_dict().items() if k != "timeline"},
        "load_before": load_before,
        "load_after": load_after,
        "waited_for_quiet_s": round(waited, 1),
        "busy_before_cores": busy,
        "warm_read": warm,
    }
    if measurement.returncode != 0:  # recorded, shown in the table; the session goes on
        record["error"] = Path(measurement.log).read_text(errors="replace")[-3000:]
        print(f"\n{row.key} failed (exit {measurement.returncode}):\n{record['error']}",
              file=sys.stderr)
        _remove(row)
        return {**record, "fsync_s": 0.0, "output_bytes": 0, "timeline": measurement.timeline}
    # Flush the output before the next row so that its write-back does not slow the next one.
    record["fsync_s"] = fsync_tree(row.output) if row.output.exists() else 0.0
    if row.check is not None and repeat == 0:
        agreement = check_output(row.output, **row.check)
        record["agreement"] = agreement.as_dict()
    record["output_bytes"] = sum(
        f.stat().st_size for f in row.output.rglob("*.safetensors")
    ) if row.output.exists() else 0
    if repeat == 0:
        record["timeline"] = measurement.timeline
    if not settings.keep_outputs:
        _remove(row)
    return record


def summarise(records: list[dict]) -> dict:
    """Median over repeats (and min/max) of each measured quantity."""
    summary = {}
    for key in ("wall_s", "cpu_s", "fsync_s", "peak_rss_bytes", "peak_private_bytes",
                "root_hwm_bytes", "background_cores"):
        values = [r[key] for r in records]
        summary[key] = statistics.median(values)
        summary[key + "_min"] = min(values)
        summary[key + "_max"] = max(values)
    first = records[0]
    summary["returncode"] = max((r["returncode"] for r in records), key=abs)
    summary["agreement"] = first.get("agreement")
    summary["output_bytes"] = first.get("output_bytes", 0)
    summary["timeline"] = first.get("timeline", [])
    summary["load"] = [r["load_before"][0] for r in records] + [records[-1]["load_after"][0]]
    summary["repeats"] = len(records)
    return summary


def run_size(params: float, settings: Settings, main: bool, stamp: str) -> dict:
    shape = settings.shape(params)
    shard_bytes = settings.shard_bytes if not settings.quick else 600_000
    count = settings.iterates if main else 1
    paths = build_family(
        settings.cache, shape, count=count, shard_bytes=shard_bytes, seed=settings.seed
    )
    models = Models(sft=paths[0], iterates=paths[1:])
    tag = f"{shape.parameters() / 1e9:.3g}B"
    work = settings.results / stamp / tag
    include = settings.include if main else (settings.include or SCALING_ROWS) & SCALING_ROWS
    rows = build_rows(
        models,
        work,
        alpha=settings.alpha,
        lam=settings.lam,
        flags=settings.flags,
        low_memory_flags=settings.low_memory_flags,
        include=include,
        flag_sweep=settings.flag_sweep and main,
        extras=settings.extras and main and not settings.quick,
    )
    records: dict[str, list[dict]] = {row.key: [] for row in rows}
    steps = [(repeat, row) for repeat in range(settings.repeats) for row in rows]
    for repeat, row in tqdm(steps, desc=f"benchmark {tag}", unit="run", file=sys.stderr):
        records[row.key].append(run_row(row, work, settings, repeat))
    return {
        "params": shape.parameters(),
        "tag": tag,
        "shape": shape.__dict__,
        "input_bytes": sum(f.stat().st_size for f in CheckpointReader(models.sft).files()),
        "input_shards": len(CheckpointReader(models.sft).files()),
        "models": {"sft": str(models.sft), "iterates": [str(p) for p in models.iterates]},
        "rows": [
            {
                "key": row.key,
                "label": row.label,
                "group": row.group,
                "flags": list(row.flags),
                "notes": row.notes,
                "command": row.command,
                **summarise(records[row.key]),
            }
            for row in rows
        ],
        "configs": rows[0].configs if rows else {},
        "raw": records,
    }


def source_state() -> dict:
    """Which code was measured: git HEAD, and a hash of the package and benchmark sources."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("mergekit_expo/**/*.py"), *root.glob("benchmarks/**/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "mergekit_expo"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        head, dirty = "?", []
    return {"git_head": head, "modified": [d for d in dirty if d], "sources_sha256":
            digest.hexdigest()[:16]}


def run_session(settings: Settings) -> dict:
    settings.cache.mkdir(parents=True, exist_ok=True)
    _self_ignoring(settings.cache)
    settings.results.mkdir(parents=True, exist_ok=True)
    _self_ignoring(settings.results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    session = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
        "machine": machine(),
        "source": source_state(),
        "load_at_start": os.getloadavg(),
        "settings": {
            "alpha": settings.alpha,
            "lambda": settings.lam,
            "iterates": settings.iterates,
            "shard_bytes": settings.shard_bytes,
            "repeats": settings.repeats,
            "flags": list(settings.flags),
            "low_memory_flags": list(settings.low_memory_flags),
            "quick": settings.quick,
            "quiet_limit": settings.quiet_limit,
        },
        "sizes": [],
    }
    for index, params in enumerate(settings.sizes):
        session["sizes"].append(run_size(params, settings, index == 0, stamp))
    session["load_at_end"] = os.getloadavg()
    session["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    session["directory"] = str(settings.results / stamp)
    out = settings.results / stamp / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(session, indent=1, default=str))
    session["results_file"] = str(out)
    return session


def _self_ignoring(directory: Path) -> None:
    """Keep generated data out of git without touching the repository's .gitignore."""
    marker = directory / ".gitignore"
    if not marker.exists():
        marker.write_text("# generated by benchmarks/: checkpoints and results, never commit\n*\n")
