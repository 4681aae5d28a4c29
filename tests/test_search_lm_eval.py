"""``--guard lm-eval:TASKS`` on a local task (a YAML over a JSONL written here, offline): the
guard is lm-eval's accuracy on the candidate in memory, recomputed here independently."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import write_config
from engines import need

from mergekit_expo.search.candidates import CandidateWeights
from mergekit_expo.search.merge_config import load_search_config
from mergekit_expo.search.run import run_search
from mergekit_expo.search.settings import SearchSettings

DOCS = [
    {"question": "The assistant answers the", "choices": ["question", "weights", "model"],
     "gold": 0},
    {"question": "A helpful answer is honest, harmless and", "choices": ["to", "the", "point"],
     "gold": 2},
    {"question": "Numbers 0 1 2", "choices": ["3", "9", "("], "gold": 0},
    {"question": "Preference pairs have a prompt, a chosen and a", "choices": ["rejected", "SFT"],
     "gold": 0},
]


@pytest.fixture
def local_task(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "expo_local.yaml").write_text(textwrap.dedent(f"""
        task: expo_local
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: gold
        metric_list:
          - metric: acc
    """))
    return folder


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


def test_lm_eval_guard_scores_the_candidate_in_memory(zoo, tmp_path, local_task, monkeypatch):
    need("lm_eval")
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    sft = zoo.base("lmeval_sft", hidden=64, seed=9, dtype=torch.float32)
    final = zoo.relative("lmeval_final", sft, seed=90, scale=0.3)
    config = write_config(tmp_path / "c.yml", {"merge_method": "expo", "base_model": str(sft),
                                               "models": [{"model": str(final)}]})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "A helpful answer is"}) + "\n")
    (tmp_path / "score_mod.py").write_text("def score(prompt, response):\n    return 1.0\n")
    settings = SearchSettings.model_validate({
        "config": config, "out_dir": tmp_path / "out", "alphas": [2.0], "prompts": prompts,
        "progress": False, "engine": "hf",
        "scorer": {"kind": "callable", "function": f"{tmp_path / 'score_mod.py'}:score"},
        "sampling": {"max_new_tokens": 2, "batch_size": 2},
        "guard": "lm-eval:expo_local", "lm_eval_args": {"include_path": str(local_task)},
    })
    report = run_search(settings)
    assert not list((tmp_path / "out").glob("**/*.safetensors"))  # no model written
    weights = CandidateWeights(load_search_config(config), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(final)
    expected = {}
    for alpha in (0.0, 2.0):
        weights.apply(alpha, 0.0)
        expected[alpha] = independent_accuracy(weights.model, tokenizer)
    assert expected[0.0] != expected[2.0]  # the two candidates are told apart
    rows = {row["alpha"]: row for row in report.rows}
    assert set(rows) == {0.0, 2.0}  # θ_T, the guard's baseline, comes first
    for alpha, row in rows.items():
        assert row["guard_n"] == len(DOCS)
        assert row["guard_mean"] == pytest.approx(expected[alpha]), alpha
