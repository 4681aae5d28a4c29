"""Commands written in the docs run as written: each benchmark command in its smallest form, the
search's worked example word for word (in a temporary folder instead of /tmp/expo-example).

Each runs as its own process from the repository root, the way a reader types it: only then does
a module in benchmarks/ named like one of the standard library's (``profile.py``) show, by
breaking ``python benchmarks/search_bench.py`` before it prints anything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "examples").glob("*/README.md")),
]
QUICK = "tests/test_benchmark_quick.py (`run --quick`, `report`)"
KERNEL_SMALL = "-m benchmarks kernel --elements 1M --agreement-elements 256K"
SCALE = "tests/test_benchmark_quick.py (`search-memory`, `breakdown`, `performance --reuse-*`)"
LARGE_PLAN = "-m benchmarks large --dry-run --cache-dir {tmp}/cache"
SEARCH_BENCH_SMALL = (
    "benchmarks/search_bench.py --workdir {tmp} --hidden 64 --layers 2 --alphas 0.3 "
    "--prompts 2 --max-new-tokens 4 --threads 1 --repeat 1"
)
LORA_BENCH_SMALL = "benchmarks/lora_bench.py --params 2M --repeats 1 --workdir {tmp}/lora"
ENGINES_HELP = "benchmarks/engines_bench.py --help"
RAY_HELP = "benchmarks/ray_bench.py --help"
GPU_DRY = "benchmarks/gpu_engines.py --workdir {tmp}/gpu --params 1B --params 7B --dry-run"
# every benchmark command in the docs -> how the suite runs it
SMALLEST = {
    "python -m benchmarks run": QUICK,
    "python -m benchmarks run --params 1.1B --params 2.2B --repeats 3 --wait-quiet 0.3 "
    "--flag-sweep --plot docs/performance.png --markdown benchmarks/results/report.md": QUICK,
    "python -m benchmarks run --quick": QUICK,
    "python -m benchmarks report benchmarks/results/<session>/results.json --plot out.png": QUICK,
    "python -m benchmarks kernel": KERNEL_SMALL,
    "python -m benchmarks breakdown --wait-quiet 0.3": SCALE,
    "python benchmarks/agreement.py": "benchmarks/agreement.py",
    "python -m benchmarks startup": "-m benchmarks startup --runs 3",
    "python -m benchmarks check-cost": "-m benchmarks check-cost --runs 1",
    "python -m benchmarks staging": (
        "-m benchmarks staging --params 2M --repeats 1 --cache-dir {tmp}/cache "
        "--work-dir {tmp}/work"
    ),
    "python benchmarks/search_bench.py --workdir /tmp/sbench --threads 1 --repeat 5": (
        SEARCH_BENCH_SMALL
    ),
    "python benchmarks/search_bench.py --workdir /tmp/sbench-big --hidden 2048 --layers 16 "
    "--prompts 8 --max-new-tokens 16 --threads 1 --repeat 2": SEARCH_BENCH_SMALL,
    "python -m benchmarks search-memory": SCALE,
    "python -m benchmarks performance --markdown docs/performance.md --plot docs/performance.png":
    SCALE,
    "python -m benchmarks large --params 7B --repeats 3": LARGE_PLAN,
    "python -m benchmarks large --dry-run": LARGE_PLAN,
    "python benchmarks/lora_bench.py --params 1.1B --repeats 3": LORA_BENCH_SMALL,
    "python -m benchmarks exactness": "-m benchmarks exactness --elements 2K",
    "python -m benchmarks kernel-ratio": "-m benchmarks kernel-ratio --elements 256K --repeats 3",
    # a vLLM engine or a Ray cluster per run: the suite runs their --help (the engine and the
    # pool themselves are tested in test_search_engines.py and test_search_pool.py)
    "python benchmarks/engines_bench.py --workdir /tmp/engines-bench --hidden 1024 --layers 4 "
    "--dtype float32 --dtype bfloat16 --prompts 16 --max-new-tokens 32 --repeat 3 "
    "--json-out benchmarks/results/engines.json": ENGINES_HELP,
    "python benchmarks/ray_bench.py --workdir /tmp/ray-bench --json-out "
    "benchmarks/results/ray.json": RAY_HELP,
    "python benchmarks/gpu_engines.py --workdir /data/gpu-bench --params 1B --params 7B": GPU_DRY,
    "python benchmarks/gpu_engines.py --workdir /tmp/gpu-bench --dry-run": GPU_DRY,
}
# what each smallest form must print: it ran to the end and checked its numbers
EXPECTED = {
    KERNEL_SMALL: r"worst: expo \(float64 slices, reused scratch\)",
    # the 7 B run writes ~40 GB for ~40 min: never in CI; its smallest form plans and checks disk
    LARGE_PLAN: r"plan: 6,738,415,616 parameters, 13\.5 GB per checkpoint; writes",
    "benchmarks/agreement.py": r"iterative alpha=1\.7 lambda=0\.2: expo 99\.99",
    "-m benchmarks startup --runs 3": r"added by the start-up hook: [+-]\d+\.\d ms wall",
    "-m benchmarks check-cost --runs 1": r"the check beyond its imports: [+-]\d+\.\d\d s CPU",
    SMALLEST["python -m benchmarks staging"]: r"re-run: +in place \(mergekit alone\) [\d.]+ s",
    SEARCH_BENCH_SMALL: r'(?s)weights update per candidate median .* "scores_identical": true',
    LORA_BENCH_SMALL: r'"adapter_differing_elements_after_bf16_rounding": 0',
    "-m benchmarks exactness --elements 2K": r"after: 0 elements off in all cases",
    "-m benchmarks kernel-ratio --elements 256K --repeats 3":
        r"median ratio over the cases \((compiled|torch)\): \d",
    ENGINES_HELP: r"Seconds per candidate \(weight update, generation, scoring\)",
    RAY_HELP: r"Candidates per minute: serial, 1 Ray worker, 2 Ray workers",
    GPU_DRY: r"7B: 6\.74 B parameters .*\n.*dry run: 39 tensors",
}


def bash_blocks(path: Path) -> list[str]:
    """The ```bash blocks of a Markdown file, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)
    return [block.replace("\\\n", " ") for block in blocks]


def documented_commands(prefixes: tuple[str, ...]) -> set[str]:
    """Command lines in ```bash blocks and in `inline code` that start with one of ``prefixes``."""
    found = set()
    for path in DOCUMENTS:
        inline = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", path.read_text(encoding="utf-8"))
        for line in [*inline, *(ln for block in bash_blocks(path) for ln in block.splitlines())]:
            line = " ".join(line.split("  #")[0].split())
            line = re.sub(r" --reuse-\w+ \S+", "", line)  # a local session's JSON: not a form
            if line.startswith(prefixes):
                found.add(line)
    return found


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_every_documented_benchmark_command_has_a_smallest_form():
    documented = documented_commands(("python -m benchmarks", "python benchmarks/"))
    assert documented == set(SMALLEST), (
        "a benchmark command in the docs has no smallest form here (or one here is no longer "
        f"documented): {sorted(documented ^ set(SMALLEST))}"
    )


def form_id(form: str) -> str:
    words = form.split()
    return words[2] if words[0] == "-m" else Path(words[0]).stem


@pytest.mark.parametrize("form", sorted(EXPECTED), ids=form_id)
def test_documented_benchmark_command_runs(form, tmp_path):
    args = form.format(tmp=tmp_path).split()
    completed = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert re.search(EXPECTED[form], completed.stdout), completed.stdout[-3000:]


def test_search_worked_example_runs_as_written(tmp_path, search_example):
    """examples/search/README.md's block (the same commands as docs/search.md), verbatim; its
    first command, making the models, is the session's ``search_example`` fixture."""
    (block,) = bash_blocks(ROOT / "examples" / "search" / "README.md")
    make = "python examples/search/make_models.py /tmp/expo-example"
    assert make in block
    in_docs = " ".join(" ".join(b.split()) for b in bash_blocks(ROOT / "docs" / "search.md"))
    for line in block.splitlines():
        assert " ".join(line.split()) in in_docs, f"docs/search.md lacks: {line}"
    import shutil

    shutil.copytree(search_example, tmp_path / "example")  # the models, not this test's outputs
    script = block.replace(make + "\n", "").replace("/tmp/expo-example", str(tmp_path / "example"))
    bin_dir = str(Path(sys.executable).parent)
    completed = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env={**env(), "PATH": bin_dir + os.pathsep + os.environ["PATH"]},
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Best: alpha = " in completed.stdout
    rows = (tmp_path / "example" / "search" / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(row)["alpha"] for row in rows) == [0, 0.5, 1, 2, 4, 8, 16]
    assert (tmp_path / "example" / "best" / "config.json").is_file()
    # the sample output in docs/search.md is what the tool prints: the same lines, numbers aside
    documented = _sample_output(ROOT / "docs" / "search.md", "Progress bars run over candidates")
    printed = completed.stdout.replace(str(tmp_path / "example"), "/tmp/expo-example")
    printed = printed[printed.index("Candidates (mean score"):]
    assert sorted(map(_shape, documented.splitlines())) == sorted(
        map(_shape, printed.splitlines())
    ), printed


def _sample_output(page: Path, after: str) -> str:
    """The first ```text block of ``page`` after the sentence ``after``."""
    text = page.read_text(encoding="utf-8")
    start = text.index("```text\n", text.index(after)) + len("```text\n")
    return text[start:text.index("```", start)]


def _shape(line: str) -> str:
    """A line of output with its numbers replaced: what must match between docs and tool."""
    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "#", line.rstrip())
