"""The search when something fails, run as a user runs it (``mergekit-expo search``): a full
disk (a real file-size limit, ``ulimit -f``) while writing each of its files, a scorer that
raises, a file where OUT_DIR should be; and the results key of a scorer or guard given as a
class instance, which must change when the class does."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import write_config

from mergekit_expo.cli import main
from mergekit_expo.search.run import run_search
from mergekit_expo.search.settings import SearchSettings

BIN = Path(sys.executable).parent
PROMPTS = ["The assistant answers the question", "User: how do I merge two models? Assistant:",
           "A helpful answer is"]
GRID = "0.1,0.3,0.5"
FAST = {"max_new_tokens": 4, "batch_size": 4}
SCORER = """
import os

CALLS = []


def score(prompt, response):
    CALLS.append(prompt)
    if len(CALLS) == int(os.environ.get("FAIL_ON_CALL", 0)):
        return {}["judge"]
    return float(len(response))
"""


@pytest.fixture(scope="module")
def inputs(zoo, tmp_path_factory) -> dict[str, Path]:
    """θ₀ and θ_T (the search tests' first pair), a config, prompts and a file scorer."""
    root = tmp_path_factory.mktemp("search_failures")
    sft = zoo.base("search_sft", hidden=64, seed=5)
    final = zoo.relative("search_it0", sft, seed=40, scale=0.02)
    config = write_config(root / "c.yml", {"merge_method": "expo", "base_model": str(sft),
                                           "models": [{"model": str(final)}]})
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    scorer = root / "scorer.py"
    scorer.write_text(SCORER)
    return {"config": config, "prompts": prompts, "scorer": scorer}


def command(inputs, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "mergekit-expo"), "search", str(inputs["config"]), str(out),
            "--scorer", f"{inputs['scorer']}:score", "--prompts", str(inputs["prompts"]),
            "--alpha", GRID, "--max-new-tokens", str(FAST["max_new_tokens"]),
            "--batch-size", str(FAST["batch_size"]), "--no-progress", *extra]


def search(args: list[str], *, file_limit: int | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command in a child process; ``file_limit``: ``ulimit -f`` in bytes, so that a
    write past it fails as on a full disk (EFBIG, with SIGXFSZ ignored as Python does)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.RLIM_INFINITY))

    return subprocess.run(
        args, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        preexec_fn=limit if file_limit is not None else None,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The command failed with one ``Error:`` line and no traceback; that line."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def settings(inputs, out: Path, **overrides) -> SearchSettings:
    """What ``command`` asks for, for run_search in this process (the same results key)."""
    return SearchSettings.model_validate({
        "config": inputs["config"], "out_dir": out, "prompts": inputs["prompts"],
        "alphas": [float(a) for a in GRID.split(",")], "sampling": FAST, "progress": False,
        "scorer": {"kind": "callable", "function": f"{inputs['scorer']}:score"}, **overrides,
    })


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory) -> Path:
    """The same search with room to write: the sizes of its files, and its rows to compare."""
    out = tmp_path_factory.mktemp("finished") / "search"
    result = search(command(inputs, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".partial-" in p.name)


# -- a full disk -------------------------------------------------------------------------------


def test_full_disk_while_appending_a_row_keeps_the_rows_before_and_resumes(
    inputs, finished, tmp_path
):
    rows = (finished / "results.jsonl").read_bytes().splitlines(keepends=True)
    out = tmp_path / "search"
    result = search(command(inputs, out), file_limit=len(rows[0]) + len(rows[1]) // 2)
    line = one_line_error(result)
    assert line.startswith(f"Error: cannot write {out / 'results.jsonl'}: File too large (EFBIG)")
    assert "run the same command again to resume" in line
    # the first candidate's row, whole; nothing of the second (the cut-off row was removed)
    kept = (out / "results.jsonl").read_bytes()
    assert kept.endswith(b"\n") and len(kept.splitlines()) == 1
    assert json.loads(kept)["scores"] == json.loads(rows[0])["scores"]
    assert not (out / "best.yml").exists() and not (out / "search.png").exists()
    resumed = run_search(settings(inputs, out))
    assert resumed.skipped == 1 and resumed.evaluated == 2


def test_full_disk_while_plotting_leaves_best_yml_and_no_partial_plot(inputs, finished, tmp_path):
    results, plot = (finished / name for name in ("results.jsonl", "search.png"))
    assert results.stat().st_size < 20_000 < plot.stat().st_size
    out = tmp_path / "search"
    out.mkdir()
    (out / "search.png").write_bytes(b"an earlier run's plot")
    line = one_line_error(search(command(inputs, out), file_limit=20_000))
    assert line.startswith(f"Error: cannot write {out / 'search.png'}: File too large (EFBIG)")
    # best.yml is written before the plot; no plot at all rather than a cut or stale one
    best = yaml.safe_load((out / "best.yml").read_text())
    assert best == yaml.safe_load((finished / "best.yml").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["best.yml", "results.jsonl"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 3


def test_full_disk_while_write_best_merges_names_the_folder(inputs, finished, tmp_path):
    plot = (finished / "search.png").stat().st_size
    assert plot < 120_000 < (Path(yaml.safe_load(inputs["config"].read_text())["base_model"])
                             / "model.safetensors").stat().st_size
    out, merged = tmp_path / "search", tmp_path / "merged"
    line = one_line_error(search(command(inputs, out, "--write-best", str(merged)),
                                 file_limit=120_000))
    assert line.startswith(f"Error: cannot write {merged}: File too large (EFBIG)")
    assert not (merged / "config.json").exists()  # the merge is staged: nothing that loads
    assert sorted(p.name for p in out.iterdir()) == ["best.yml", "results.jsonl", "search.png"]


def test_full_disk_while_writing_the_best_adapter_leaves_no_adapter(zoo, tmp_path):
    from test_lora import make_adapter

    base = zoo.base("lora_sft", hidden=64, seed=7)
    adapter = make_adapter(base, tmp_path / "dpo", seed=32)
    weights = (adapter / "adapter_model.safetensors").stat().st_size
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": p, "chosen": " helpful and honest.", "rejected": " 0 1 2"}) + "\n"
        for p in PROMPTS))
    config = write_config(tmp_path / "c.yml", {"merge_method": "expo", "base_model": str(base),
                                               "models": [{"model": f"{base}+{adapter}"}]})
    out = tmp_path / "search"
    (out / "best_adapter").mkdir(parents=True)  # an earlier run's winner
    (out / "best_adapter" / "adapter_config.json").write_text("{}")
    result = search([str(BIN / "mergekit-expo"), "search", str(config), str(out), "--pairs",
                     str(pairs), "--alpha", "0.4", "--no-progress"], file_limit=weights // 2)
    line = one_line_error(result)
    assert line.startswith(f"Error: cannot write {out / 'best_adapter'}: File too large (EFBIG)")
    # best.yml first; then neither a partial adapter nor the earlier one
    assert sorted(p.name for p in out.iterdir()) == ["best.yml", "results.jsonl"]
    assert yaml.safe_load((out / "best.yml").read_text())["parameters"] == {"alpha": 0.4}


def test_an_out_dir_that_cannot_be_made_is_named(inputs, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "search"
    result = CliRunner().invoke(main, command(inputs, out)[1:])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"Error: cannot write {out}: Not a directory (ENOTDIR)" in result.output


# -- a scorer that raises ----------------------------------------------------------------------


def test_a_scorer_that_raises_names_candidate_prompt_and_scorer_and_keeps_rows(
    inputs, tmp_path
):
    out = tmp_path / "search"
    # the second candidate (α = 0.3), its second prompt: call 3 + 2
    line = one_line_error(search(command(inputs, out), env={"FAIL_ON_CALL": "5"}))
    assert line == (
        f"Error: α = 0.3, λ = 0: scorer {inputs['scorer']}:score raised KeyError: 'judge' at "
        "scorer.py:10 on prompt 2 of 3 ('User: how do I merge two models? Assista…'); 1 finished "
        f"candidate kept in {out / 'results.jsonl'}; the same command resumes from there"
    )
    assert [json.loads(r)["alpha"] for r in (out / "results.jsonl").read_text().splitlines()] \
        == [0.1]
    resumed = run_search(settings(inputs, out))
    assert resumed.skipped == 1 and resumed.evaluated == 2


# -- a scorer or a guard given as an instance --------------------------------------------------


JUDGE = """
class {name}:
    def __init__(self, weight):
        self.weight = weight

    def __call__(self, prompt, response):
        return self.weight * len(response)
"""


def test_an_instance_scorer_and_guard_are_keyed_by_their_class_source(
    inputs, tmp_path, monkeypatch
):
    """The instances are made in one file, their classes live in two other modules: editing a
    class (nothing else) starts fresh rows, for the scorer and for the guard."""
    classes = {"judges_lib": "Judge", "guards_lib": "Guard"}
    for module, name in classes.items():
        (tmp_path / f"{module}.py").write_text(JUDGE.format(name=name))
        monkeypatch.delitem(sys.modules, module, raising=False)  # given back afterwards
    monkeypatch.syspath_prepend(str(tmp_path))
    made = tmp_path / "judges.py"
    made.write_text("from guards_lib import Guard\nfrom judges_lib import Judge\n\n"
                    "judge = Judge(1.0)\nguard = Guard(0.5)\n")
    run = settings(inputs, tmp_path / "search", alphas=[0.3], limit=2,
                   scorer={"kind": "callable", "function": f"{made}:judge"},
                   guard=f"{made}:guard")
    assert run_search(run).evaluated == 2  # α = 0.3 and θ_T, the guard's baseline
    assert run_search(run).evaluated == 0
    for module in classes:  # the method's code changes, in the class's own file only
        path = tmp_path / f"{module}.py"
        path.write_text(path.read_text().replace("len(response)", "len(response.split())"))
        assert run_search(run).evaluated == 2, module
    assert run_search(run).evaluated == 0
