"""The performance benchmark (benchmarks/) on tiny checkpoints, so that it cannot rot.

``python -m benchmarks run --quick`` builds ~1 M-parameter Llama checkpoints, runs every row as its
own process exactly as the full benchmark does, checks every output against the float64 formula
and writes the table and the plot. About 40 s on two cores, nearly all of it mergekit's imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import run_measured  # noqa: E402

MB = 1 << 20
REQUIRED_ROWS = {
    "floor",
    "expo",
    "task_arithmetic",
    "inram",
    "expo_lowmem",
    "lam_floor",
    "lam_onepass",
    "lam_twostep",
}
EXACT_ROWS = ("expo", "expo_lowmem", "lam_onepass")


def test_sampler_sees_private_memory_of_the_whole_process_tree(tmp_path):
    allocate = "import time; b = bytearray({size}); time.sleep(0.6)"
    child = f"{sys.executable} -c '{allocate.format(size=150 * MB)}'"
    script = f"{child} & {child} & wait"
    result = run_measured(["bash", "-c", script], log=tmp_path / "log", interval=0.02)
    assert result.returncode == 0
    assert result.peak_private_bytes >= 280 * MB  # two children × 150 MB, summed over the tree
    assert result.peak_rss_bytes >= result.peak_private_bytes
    assert result.wall_s >= 0.6 and result.cpu_s > 0


@pytest.fixture(scope="module")
def quick_session(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    markdown = work / "report.md"
    plot = work / "performance.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick",
         "--cache-dir", str(work / "cache"), "--results-dir", str(work / "results"),
         "--markdown", str(markdown), "--plot", str(plot)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    elapsed = time.perf_counter() - start
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = sorted((work / "results").glob("*/results.json"))
    assert len(results) == 1
    session = json.loads(results[0].read_text())
    return session, markdown.read_text(), plot, completed.stdout, elapsed


def test_quick_benchmark_has_every_row_and_measures_each(quick_session):
    session, _, _, _, _ = quick_session
    rows = {row["key"]: row for row in session["sizes"][0]["rows"]}
    assert REQUIRED_ROWS <= set(rows)
    for key, row in rows.items():
        assert row["returncode"] == 0, key
        assert row["wall_s"] > 0, key
        assert row["cpu_s"] > 0, key
        assert 0 < row["peak_private_bytes"] <= row["peak_rss_bytes"], key
        assert row["output_bytes"] > 0, key
        assert row["timeline"], key
    # the merge processes import torch and mergekit: far more private memory than the floor
    assert rows["expo"]["peak_private_bytes"] > 3 * rows["floor"]["peak_private_bytes"]


def test_quick_benchmark_outputs_agree_with_the_float64_formula(quick_session):
    session, _, _, _, _ = quick_session
    rows = {row["key"]: row for row in session["sizes"][0]["rows"]}
    params = session["sizes"][0]["params"]
    for key in EXACT_ROWS:
        agreement = rows[key]["agreement"]
        assert agreement["complete"], (key, agreement)
        assert agreement["elements"] == params, key
        assert agreement["share"] >= 0.9999, (key, agreement)
    for key in ("task_arithmetic", "inram", "lam_twostep"):
        agreement = rows[key]["agreement"]
        assert agreement["complete"] and agreement["elements"] == params, key
        # bf16 arithmetic / a bf16 intermediate: measurably less exact than expo
        assert agreement["share"] < rows["expo"]["agreement"]["share"], key
    assert rows["floor"]["agreement"] is None


def test_quick_benchmark_prints_the_table_targets_and_plot(quick_session):
    session, markdown, plot, stdout, _ = quick_session
    for row in session["sizes"][0]["rows"]:
        assert f"| {row['label']} |" in markdown
        assert f"| {row['label']} |" in stdout
    assert "expo wall time / task_arithmetic's" in markdown
    assert "(λ, α) one pass wall time / two-step recipe's" in markdown
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_benchmark_stays_quick(quick_session):
    *_, elapsed = quick_session
    assert elapsed < 240  # ~40 s on two idle cores; generous for loaded CI machines


def test_report_command_reprints_the_table_and_redraws_the_plot(quick_session, tmp_path):
    """``python -m benchmarks report RESULTS.json --plot out.png`` (benchmarks/README.md)."""
    session, *_ = quick_session
    results = tmp_path / "results.json"
    results.write_text(json.dumps(session))
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "report", str(results), "--plot", "out.png"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    for row in session["sizes"][0]["rows"]:
        assert f"| {row['label']} |" in completed.stdout
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
