"""Smoke version of examples/toy_alignment: a few steps of SFT, DPO and iterative DPO with TRL,
then an ExPO merge of two of the checkpoints through the real mergekit engine.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_merge_in_process
from reference import formula64, load

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy_alignment"
sys.path.insert(0, str(TOY))

import toy_task  # noqa: E402


def test_gold_reward_documented_values():
    """R(x, y) = Σ s(w) − 1.5·max(0, L − 12), exactly as toy_task's docstring says."""
    prompt = "A n1 n2 >"
    assert toy_task.gold_reward(prompt, " a0 a1 </s>") == 2.0
    assert toy_task.gold_reward(prompt, " a0 b1 f2 x0 </s>") == 1.0 - 0.5 + 0.0 - 2.0
    assert toy_task.gold_reward(prompt, "") == 0.0
    assert toy_task.gold_reward(prompt, " > n3 </s>") == -2.0  # prompt words: −1 each
    best = " " + " ".join(["a3"] * 12) + " </s>"
    assert toy_task.gold_reward(prompt, best) == 12.0
    assert toy_task.gold_reward(prompt, " " + " ".join(["a3"] * 14)) == 14.0 - 1.5 * 2
    # words after the first </s>, padding and BOS do not count
    assert toy_task.gold_reward("<s> " + prompt, " a0 </s> a1 a2 <pad>") == 1.0
    assert toy_task.gold_reward("B n0 n0 >", " a0 b0 </s>") == -0.5 + 1.0
    assert toy_task.gold_scorer([prompt, "C n1 n1 >"], [" a1", " c1 c2 x2"]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        toy_task.gold_reward("hello", " a0")


def test_tokenizer_round_trip():
    tokenizer = toy_task.build_tokenizer()
    assert len(tokenizer) == len(toy_task.VOCABULARY) < 100
    ids = tokenizer("A n1 n2 > a0 x1 </s>")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "A n1 n2 > a0 x1"


def test_preference_pairs_are_labelled_by_the_gold_reward():
    pairs = toy_task.offline_preference_pairs(toy_task.all_prompts(), 50, seed=3)
    assert pairs
    for pair in pairs:
        chosen = toy_task.gold_reward(pair["prompt"], pair["chosen"])
        assert chosen > toy_task.gold_reward(pair["prompt"], pair["rejected"])
        assert pair["chosen"].endswith(" </s>") and pair["rejected"].endswith(" </s>")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The training pipeline of run.py with --smoke settings, in this process."""
    pytest.importorskip("trl")
    import toy_train

    spec = importlib.util.spec_from_file_location("toy_alignment_run", TOY / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)

    run.quiet_libraries()
    settings = toy_train.Settings(**toy_train.SMOKE)
    out = tmp_path_factory.mktemp("toy")
    return out, settings, run.train_all(out, settings)


def test_smoke_training_writes_checkpoints_at_the_right_steps(smoke_run):
    out, settings, train = smoke_run
    steps = settings.checkpoint_steps()
    assert steps == [1, 2, 4, 10]  # 10 %, 20 %, 40 %, 100 % of 10 DPO steps
    assert sorted(int(s) for s in train["dpo"]) == steps
    log = json.loads((out / "dpo" / "dpo_log.json").read_text())
    assert log[-1]["step"] == settings.dpo_steps
    sft = load(Path(train["sft"]))
    previous = sft
    for step in steps:
        weights = load(Path(train["dpo"][str(step)]))
        assert weights.keys() == sft.keys()
        moved = sum(float((weights[k] - previous[k]).abs().sum()) for k in sft)
        assert moved > 0, f"DPO checkpoint at step {step} equals the previous one"
        previous = weights
    assert len(train["iterative"]) == settings.iterations >= 3
    for t in range(1, settings.iterations + 1):
        pairs = (out / "iterative" / f"iter{t}_pairs.jsonl").read_text().splitlines()
        assert pairs, f"iteration {t} produced no preference pairs"
        assert (Path(train["iterative"][t - 1]) / "model.safetensors").exists()


def test_smoke_expo_merge_matches_the_float64_formula(smoke_run, tmp_path):
    out, settings, train = smoke_run
    import toy_eval
    import toy_train

    sft, early, final = Path(train["sft"]), Path(train["dpo"]["2"]), Path(train["dpo"]["10"])
    config = yaml_config(sft, [final], alpha=1.5)
    merged = run_merge_in_process(config, tmp_path / "merged", copy_tokenizer=True)
    weights, theta0, theta1 = load(merged), load(sft), load(final)
    # Dyadic α and λ keep every float64 product and sum of float32 inputs exact, so the float64
    # formula is the exact value and the merge must equal it rounded once, bit for bit.
    for name, tensor in weights.items():
        expected = formula64(theta0[name], theta1[name], alpha=1.5)
        assert torch.equal(tensor, expected.to(tensor.dtype)), name
    # the iterative form too: θ̄ = the early checkpoint, θ_T = the final one
    config = yaml_config(sft, [early, final], alpha=0.5, lam=0.25)
    merged2 = run_merge_in_process(config, tmp_path / "merged2", copy_tokenizer=True)
    theta_mid = load(early)
    for name, tensor in load(merged2).items():
        expected = formula64(theta0[name], theta1[name], [theta_mid[name]], alpha=0.5, lam=0.25)
        assert torch.equal(tensor, expected.to(tensor.dtype)), name
    # the merged model loads with transformers and generates scoreable answers
    model, tokenizer = toy_train.load(merged)
    prompts = ["A n1 n2 >", "D n0 n7 >"]
    completions = toy_train.sample(model, tokenizer, prompts, seed=0)
    rewards = toy_task.gold_scorer(prompts, completions)
    assert all(isinstance(r, float) for r in rewards)
    assert toy_eval.pearson([0, 1, 2], [1.0, 3.0, 5.0]) == pytest.approx(1.0)


def yaml_config(reference: Path, models: list[Path], *, alpha: float, lam: float = 0.0) -> dict:
    return {
        "merge_method": "expo",
        "base_model": str(reference),
        "models": [{"model": str(m)} for m in models],
        "parameters": {"alpha": alpha, "lambda": lam},
        "dtype": "float32",
    }


def test_smoke_search_scores_with_the_gold_reward(smoke_run, tmp_path):
    """`mergekit-expo search --scorer toy_task:gold_reward` on two smoke checkpoints."""
    out, settings, train = smoke_run
    import toy_eval

    sft, final = Path(train["sft"]), Path(train["dpo"]["10"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["A n1 n2 >"] * 4))
    config = toy_eval.write_config(tmp_path / "expo.yml", sft, [final])
    ev = toy_eval.EvalSettings(batch_size=4)
    rows = toy_eval.run_search(config, tmp_path / "search", prompts, ev, alphas="0,1")
    assert sorted(r["alpha"] for r in rows) == [0.0, 1.0]
    for row in rows:
        expected = [toy_task.gold_reward("A n1 n2 >", text) for text in row["responses"]]
        assert row["scores"] == expected
    assert (tmp_path / "search" / "best.yml").exists()


def test_smoke_implicit_reward_and_geometry(smoke_run):
    """At α = 0 the on-policy and fixed implicit rewards coincide; weight geometry is sane."""
    out, settings, train = smoke_run
    import toy_eval
    import toy_train

    sft, final = Path(train["sft"]), Path(train["dpo"]["10"])
    model, tokenizer = toy_train.load(final)
    prompts = ["A n1 n2 >", "B n3 n4 >", "C n0 n0 >"]
    responses = toy_train.sample(model, tokenizer, prompts, seed=1)
    rows = [
        {"alpha": a, "lambda": 0.0, "responses": responses, "mean": 0.0, "mean_length_tokens": 1}
        for a in (0.0, 1.0, 2.0)
    ]
    points = toy_eval.implicit_rewards(sft, final, [], rows, prompts, 0.1, responses)
    assert points[0]["implicit_reward_on_policy"] == pytest.approx(
        points[0]["implicit_reward_fixed"]
    )
    # with the same y for every α, log π_α(y|x) changes with α: the merge was applied
    assert points[0]["implicit_reward_fixed"] != points[2]["implicit_reward_fixed"]
    summary = toy_eval.implicit_summary(points)
    assert -1 <= summary["pearson_fixed"] <= 1
    geometry = toy_eval.weight_geometry(sft, {"a": Path(train["dpo"]["2"]), "b": final}, "b")
    assert geometry["b"]["norm_ratio"] == pytest.approx(1.0)
    assert geometry["b"]["cosine"] == pytest.approx(1.0)
    assert 0 < geometry["a"]["norm_ratio"] < 1
