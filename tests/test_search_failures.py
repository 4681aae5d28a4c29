"""The search when something fails, run as a user runs it (``mergekit-expo search``): a full
disk (a real file-size limit, ``ulimit -f``) while writing each of its files, a scorer that
raises, a file where OUT_DIR should be; and the results key of a scorer or guard given as a
class instance, which must change when the class does."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from conftest import search_inputs, write_config

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
    config, prompts = search_inputs(zoo, root, "search", seed=5, final_seed=40, scale=0.02,
                                    prompts=PROMPTS)
    scorer = root / "scorer.py"
    scorer.write_text(SCORER)
    return {"config": config, "prompts": prompts, "scorer": scorer}


def command(inputs, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "mergekit-expo"), "search", str(inputs["config"]), str(out),
            "--scorer", f"{inputs['scorer']}:score", "--prompts", str(inputs["prompts"]),
            "--alpha", GRID, "--max-new-tokens", str(FAST["max_new_tokens"]),
            "--batch-size", str(FAST["batch_size"]), "--no-progress", *extra]


def start(args: list[str], *, file_limit: int | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """The real command in a child process; ``file_limit``: ``ulimit -f`` in bytes, so that a
    write past it fails as on a full disk (EFBIG, with SIGXFSZ ignored as Python does)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.RLIM_INFINITY))

    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {}),
             # no bytecode caching under the limit: a .pyc cut short would break later processes
             **({"PYTHONDONTWRITEBYTECODE": "1"} if file_limit is not None else {})},
        preexec_fn=limit if file_limit is not None else None,
    )


def one_line_error(run) -> str:
    """The command (a process, or a click ``Result`` of it run in this process) failed with one
    ``Error:`` line and no traceback; that line."""
    if isinstance(run, subprocess.Popen):
        stderr = run.communicate(timeout=600)[1]
        code = run.returncode
    else:
        code, stderr = run.exit_code, run.stderr
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def settings(inputs, out: Path, **overrides) -> SearchSettings:
    """What ``command`` asks for, for run_search in this process (the same results key)."""
    return SearchSettings.model_validate({
        "config": inputs["config"], "out_dir": out, "prompts": inputs["prompts"],
        "alphas": [float(a) for a in GRID.split(",")], "sampling": FAST, "progress": False,
        "scorer": {"kind": "callable", "function": f"{inputs['scorer']}:score"}, **overrides,
    })


@pytest.fixture(scope="module")
def runs(inputs, zoo, tmp_path_factory) -> dict[str, tuple[Any, Path]]:
    """The failing commands, started together (each is mostly its start-up): name → (process,
    or the click result of the scorer's run in this process, and its OUT_DIR). An earlier run's
    plot and best adapter are in place where they must go."""
    from test_lora import make_adapter

    root = tmp_path_factory.mktemp("failing")
    outs = {name: root / name / "search" for name in ("scorer", "plot", "merge", "adapter")}
    for out in outs.values():
        out.mkdir(parents=True)
    (outs["plot"] / "search.png").write_bytes(b"an earlier run's plot")
    (outs["adapter"] / "best_adapter").mkdir()
    (outs["adapter"] / "best_adapter" / "adapter_config.json").write_text("{}")

    base = zoo.base("lora_sft", hidden=64, seed=7)
    adapter = make_adapter(base, root / "dpo", seed=32)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": p, "chosen": " helpful and honest.", "rejected": " 0 1 2"}) + "\n"
        for p in PROMPTS))
    config = write_config(root / "adapter.yml", {"merge_method": "expo", "base_model": str(base),
                                                 "models": [{"model": f"{base}+{adapter}"}]})
    weights = (adapter / "adapter_model.safetensors").stat().st_size
    processes = {
        # above results.jsonl and best.yml, below the PNG (about 50 kB)
        "plot": start(command(inputs, outs["plot"]), file_limit=20_000),
        # above the PNG, below the merged model's weights (250 kB)
        "merge": start(command(inputs, outs["merge"], "--write-best",
                               str(outs["merge"].parent / "merged")),
                       file_limit=120_000),
        "adapter": start([str(BIN / "mergekit-expo"), "search", str(config), str(outs["adapter"]),
                          "--pairs", str(pairs), "--alpha", "0.4", "--no-progress"],
                         file_limit=weights // 2),
    }
    # meanwhile, in this process: the second candidate (α = 0.3), its second prompt: call 3 + 2
    scorer = CliRunner().invoke(main, command(inputs, outs["scorer"])[1:],
                                env={"FAIL_ON_CALL": "5"})
    yield {"scorer": (scorer, outs["scorer"]),
           **{name: (process, outs[name]) for name, process in processes.items()}}
    for process in processes.values():
        process.kill()
        process.communicate()


# -- a full disk -------------------------------------------------------------------------------


def test_full_disk_while_appending_a_row_keeps_the_rows_before_and_resumes(
    inputs, runs, tmp_path
):
    _, earlier = runs["scorer"]
    out = tmp_path / "search"
    shutil.copytree(earlier, out)  # a run that finished α = 0.1
    before = (out / "results.jsonl").read_bytes()
    assert len(before.splitlines()) == 1
    line = one_line_error(start(command(inputs, out), file_limit=len(before) * 3 // 2))
    assert line.startswith(f"Error: cannot write {out / 'results.jsonl'}: File too large (EFBIG)")
    assert "run the same command again to resume" in line
    # the row of α = 0.3 did not fit: cut off again, the row before it whole
    assert (out / "results.jsonl").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl"]
    resumed = run_search(settings(inputs, out))
    assert resumed.skipped == 1 and resumed.evaluated == 2


def test_full_disk_while_plotting_leaves_best_yml_and_no_partial_plot(runs):
    process, out = runs["plot"]
    line = one_line_error(process)
    assert line.startswith(f"Error: cannot write {out / 'search.png'}: File too large (EFBIG)")
    # best.yml is written before the plot; no plot at all rather than a cut or an earlier one
    assert sorted(p.name for p in out.iterdir()) == ["best.yml", "results.jsonl"]
    rows = [json.loads(r) for r in (out / "results.jsonl").read_text().splitlines()]
    winner = max(rows, key=lambda r: r["mean"])
    assert len(rows) == 3 and yaml.safe_load((out / "best.yml").read_text())["parameters"] == {
        "alpha": winner["alpha"]}


def test_full_disk_while_write_best_merges_names_the_folder(runs):
    process, out = runs["merge"]
    merged = out.parent / "merged"
    line = one_line_error(process)
    assert line.startswith(f"Error: cannot write {merged}: File too large (EFBIG)")
    assert not (merged / "config.json").exists()  # the merge is staged: nothing that loads
    assert sorted(p.name for p in out.iterdir()) == ["best.yml", "results.jsonl", "search.png"]


def test_full_disk_while_writing_the_best_adapter_leaves_no_adapter(runs):
    process, out = runs["adapter"]
    line = one_line_error(process)
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
    inputs, runs, tmp_path
):
    process, earlier = runs["scorer"]
    line = one_line_error(process)
    assert line == (
        f"Error: α = 0.3, λ = 0: scorer {inputs['scorer']}:score raised KeyError: 'judge' at "
        "scorer.py:10 on prompt 2 of 3 ('User: how do I merge two models? Assista…'); 1 finished "
        f"candidate kept in {earlier / 'results.jsonl'}; the same command resumes from there"
    )
    out = tmp_path / "search"
    shutil.copytree(earlier, out)
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


def test_a_guard_that_raises_is_named_as_the_guard(inputs, tmp_path):
    from mergekit_expo.search.scorers import ScorerError

    guard = tmp_path / "guard.py"
    guard.write_text("def guard(prompt, response):\n    return 1 / 0\n")
    run = settings(inputs, tmp_path / "search", alphas=[0.3], limit=1, guard=f"{guard}:guard")
    with pytest.raises(ScorerError) as error:
        run_search(run)
    assert str(error.value) == (  # θ_T, the guard's baseline, comes first
        f"α = 0, λ = 0: guard {guard}:guard raised ZeroDivisionError: division by zero at "
        f"guard.py:2 on prompt 1 of 1 ('The assistant answers the question'); 0 finished "
        f"candidates kept in {tmp_path / 'search' / 'results.jsonl'}; the same command resumes "
        "from there"
    )
