"""``--guard lm-eval:TASKS`` on a local task (a YAML over a JSONL written here, offline): the
guard is lm-eval's accuracy on the candidate in memory, recomputed here independently."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_config
from engines import TASK_DOCS, need, write_local_task

from mergekit_expo.search.candidates import CandidateWeights
from mergekit_expo.search.merge_config import load_search_config
from mergekit_expo.search.run import run_search
from mergekit_expo.search.settings import SearchSettings

DOCS = TASK_DOCS


@pytest.fixture
def local_task(tmp_path):
    return write_local_task(tmp_path / "tasks")


def independent_accuracy(model, tokenizer) -> float:
    """Multiple-choice accuracy as lm-eval defines it: the choice (after a space) whose tokens
    have the highest summed log-likelihood after the question."""
    correct = 0
    for doc in DOCS:
        context = tokenizer(doc["question"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[k - 1, whole[k]]) for k in range(len(context),
                                                                          len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["gold"]
    return correct / len(DOCS)


@pytest.fixture(scope="module")
def lm_case(zoo, tmp_path_factory):
    """A float32 θ₀, θ_T pair whose α = 0 and α = 2 candidates lm-eval tells apart, with the
    accuracy of each recomputed here."""
    need("lm_eval")
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lm_eval")
    sft = zoo.base("lmeval_sft", hidden=64, seed=9, dtype=torch.float32)
    final = zoo.relative("lmeval_final", sft, seed=90, scale=0.3)
    config = write_config(root / "c.yml", {"merge_method": "expo", "base_model": str(sft),
                                           "models": [{"model": str(final)}]})
    weights = CandidateWeights(load_search_config(config), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(final)
    expected = {}
    for alpha in (0.0, 2.0):
        weights.apply(alpha, 0.0)
        expected[alpha] = independent_accuracy(weights.model, tokenizer)
    assert expected[0.0] != expected[2.0]  # the two candidates are told apart
    return {"config": config, "expected": expected, "tasks": write_local_task(root / "tasks")}


def test_lm_eval_guard_scores_the_candidate_in_memory(lm_case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "A helpful answer is"}) + "\n")
    (tmp_path / "score_mod.py").write_text("def score(prompt, response):\n    return 1.0\n")
    settings = SearchSettings.model_validate({
        "config": lm_case["config"], "out_dir": tmp_path / "out", "alphas": [2.0],
        "prompts": prompts, "progress": False, "engine": "hf",
        "scorer": {"kind": "callable", "function": f"{tmp_path / 'score_mod.py'}:score"},
        "sampling": {"max_new_tokens": 2, "batch_size": 2},
        "guard": "lm-eval:expo_local", "lm_eval_args": {"include_path": str(lm_case["tasks"])},
    })
    report = run_search(settings)
    assert not list((tmp_path / "out").glob("**/*.safetensors"))  # no model written
    rows = {row["alpha"]: row for row in report.rows}
    assert set(rows) == {0.0, 2.0}  # θ_T, the guard's baseline, comes first
    for alpha, row in rows.items():
        assert row["guard_n"] == len(DOCS)
        assert row["guard_mean"] == pytest.approx(lm_case["expected"][alpha]), alpha


def test_lm_eval_scorer_is_the_task_metric_of_each_candidate(lm_case, tmp_path, monkeypatch):
    """``--scorer lm-eval:TASKS`` from the command line: no prompts, no generation; each
    candidate's score is the task's accuracy on it, arguments passed through (``limit``)."""
    from click.testing import CliRunner

    from mergekit_expo.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "search", str(lm_case["config"]), str(out), "--alpha", "0,2",
        "--scorer", "lm-eval:expo_local", "--engine", "hf", "--no-progress",
        "--lm-eval-args", f"include_path={lm_case['tasks']},limit=3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Best: alpha = " in result.output
    rows = {r["alpha"]: r for r in map(json.loads, (out / "results.jsonl").read_text()
                                       .splitlines())}
    assert set(rows) == {0.0, 2.0}
    for row in rows.values():
        assert row["n"] == 3 and row["mean_length_tokens"] is None  # limit=3 reached lm-eval
        assert row["settings"]["scorer"]["tasks"] == ["expo_local"]
    settings = SearchSettings.model_validate({   # the whole task: the accuracy recomputed here
        "config": lm_case["config"], "out_dir": tmp_path / "all", "alphas": [0.0, 2.0],
        "progress": False, "engine": "hf", "scorer": {"kind": "lm_eval", "tasks": "expo_local"},
        "lm_eval_args": {"include_path": str(lm_case["tasks"])}})
    for row in run_search(settings).rows:
        assert row["mean"] == pytest.approx(lm_case["expected"][row["alpha"]]), row["alpha"]
    with pytest.raises(ValueError, match="lm-eval:TASKS scores whole tasks: hold-out"):
        SearchSettings.model_validate({**settings.model_dump(), "holdout_fraction": 0.5})


def test_local_tasks_are_found_without_indexing_lm_evals_own(tmp_path):
    need("lm_eval")
    from lm_eval.tasks import TaskManager

    from mergekit_expo.search.lm_eval_guard import local_tasks_suffice, task_manager

    tasks = write_local_task(tmp_path / "tasks")
    manager = task_manager(tasks, ["expo_local"])
    assert "expo_local" in manager.all_subtasks
    assert "hellaswag" not in manager.all_tasks  # lm-eval's own tasks were not indexed
    (tasks / "group.yaml").write_text("group: expo_group\ntask:\n  - expo_local\n")
    local = TaskManager(include_path=str(tasks), include_defaults=False)
    assert "expo_group" in local.all_groups
    assert local_tasks_suffice(local, ["expo_local"])
    assert not local_tasks_suffice(local, ["expo_group"])  # its members may be lm-eval's own
    assert not local_tasks_suffice(local, ["expo_local", "hellaswag"])
    assert not local_tasks_suffice(local, [])
