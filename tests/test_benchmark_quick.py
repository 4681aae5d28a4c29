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
# One row per program the benchmark runs (floor.py, mergekit-yaml with each method, inram.py,
# mergekit-multi): the rows left out (expo_lowmem, lam_floor, ta_*) run the same programs with
# other flags or inputs, and their configs are still built (and checked) below.
QUICK_ROWS = ("floor", "expo", "task_arithmetic", "inram", "lam_onepass", "lam_twostep")
ALL_ROWS = {*QUICK_ROWS, "expo_lowmem", "lam_floor"}
EXACT_ROWS = ("expo", "lam_onepass")


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
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", ",".join(QUICK_ROWS),
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
    assert set(QUICK_ROWS) == set(rows)
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


def test_every_row_is_built_with_the_session_programs(tmp_path):
    """The rows the quick run leaves out are the same programs as its rows, with other flags."""
    from benchmarks.contenders import Models, build_rows

    models = Models(sft=tmp_path / "sft", iterates=[tmp_path / "it1", tmp_path / "it2"])
    rows = {row.key: row for row in build_rows(models, tmp_path, alpha=0.3, lam=0.3)}
    assert ALL_ROWS <= set(rows)
    assert rows["expo_lowmem"].command[:2] == rows["expo"].command[:2]
    assert rows["expo_lowmem"].command[3:] == ["--out-shard-size", "500M"]
    assert rows["lam_floor"].command[:2] == rows["floor"].command[:2]


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


def benchmarks(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    completed = subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=cwd, env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


@pytest.fixture(scope="module")
def scale_sessions(tmp_path_factory):
    """``search-memory`` and ``breakdown`` in their smallest forms (their JSON feeds the page)."""
    work = tmp_path_factory.mktemp("scale")
    dirs = ["--cache-dir", str(work / "cache"), "--results-dir", str(work / "results")]
    search = benchmarks("search-memory", "--params", "2M", "--intermediates", "2", *dirs)
    breakdown = benchmarks("breakdown", "--params", "2M", "--repeats", "1", *dirs)
    (search_json,) = (work / "results").glob("*/search-memory/search_memory.json")
    return {
        "search": (search.stdout, json.loads(search_json.read_text()), search_json),
        "breakdown": (breakdown.stdout, work / "results" / "breakdown" / "breakdown.json"),
    }


def test_search_memory_measures_the_search_process(scale_sessions):
    stdout, session, _ = scale_sessions["search"]
    (row,) = session["rows"]
    assert row["T"] == 3 and row["intermediates"] == 2 and row["candidates"] == 2
    assert 0 < row["peak_private_bytes"] <= row["peak_rss_bytes"]
    assert row["private_ratio"] == row["peak_private_bytes"] / row["checkpoint_bytes"]
    assert len(row["update_seconds"]) == 2 and all(u > 0 for u in row["update_seconds"])
    assert row["read_once_bytes"] == 4 * row["checkpoint_bytes"]  # θ₀, θ₁, θ₂, θ_T
    assert "| 3 (2) |" in stdout


def test_breakdown_prints_the_phases(scale_sessions):
    stdout, _ = scale_sessions["breakdown"]
    assert "| merge method (kernel" in stdout


def test_performance_page_is_written_from_the_sessions(quick_session, scale_sessions, tmp_path):
    """``python -m benchmarks performance`` (docs/performance.md) from reused sessions."""
    session, *_ = quick_session
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps(session))
    _, search, search_json = scale_sessions["search"]
    _, breakdown_json = scale_sessions["breakdown"]
    page = tmp_path / "performance.md"
    benchmarks("performance", "--markdown", str(page), "--plot", str(tmp_path / "p.png"),
               "--reuse-run", str(run_json), "--reuse-breakdown", str(breakdown_json),
               "--reuse-search", str(search_json), "--skip-large")
    text = page.read_text()
    assert text.startswith("# Performance\n")
    assert f"`{session['command']}`" in text and f"`{search['command']}`" in text
    for row in session["sizes"][0]["rows"]:
        assert f"| {row['label']} |" in text
    assert "expo ÷ task_arithmetic wall time, same flags: **" in text
    assert f"**{search['rows'][0]['private_ratio']:.2f}**" in text
    assert "| merge method (kernel, checks) |" in text
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_large_refuses_to_start_without_the_disk_it_needs(tmp_path):
    """The 7 B benchmark checks `df` before writing anything (here: a size no disk holds)."""
    from benchmarks.scale import large

    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match=r"not enough free disk under .*cache: the 7 B run "
                       r"writes \d+\.\d GB \(\+ 2 GB margin\), \d+\.\d GB are free"):
        large(1e13, cache, tmp_path / "results", 1, 0, (), 2, 4, False, False)
    assert [p.name for p in cache.iterdir()] == [".gitignore"]  # nothing else written


def test_large_waits_for_memory_and_gives_up_with_a_reason():
    from benchmarks.scale import mem_available, wait_for_memory

    messages = []
    assert wait_for_memory(0, log=messages.append) < 1 and "MemAvailable" in messages[0]
    with pytest.raises(RuntimeError, match=r"MemAvailable stayed at .* GB < .* GB for"):
        wait_for_memory(mem_available() * 100, poll=0.01, timeout=0.05, log=messages.append)
    assert any(m.startswith("waiting for memory") for m in messages)
