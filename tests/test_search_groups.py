"""Per-group α/λ, trials, guard and hold-out of the search, on tiny real checkpoints: best.yml
merged by mergekit is the scored candidate bit for bit, only changed groups are rewritten, the
guard constraint holds, and a re-run evaluates nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import run_merge_in_process, write_config
from reference import formula64, load

from mergekit_expo.cli import main
from mergekit_expo.search.candidates import CandidateWeights
from mergekit_expo.search.groups import (
    OTHER,
    Group,
    assign,
    build_groups,
    grouped_config,
    layer_bands,
    render,
)
from mergekit_expo.search.merge_config import load_search_config
from mergekit_expo.search.run import run_search
from mergekit_expo.search.settings import SearchSettings
from mergekit_expo.search.weights import GroupedWeights

PROMPTS = ["The assistant answers", "A helpful answer is", "Numbers 0 1 2", "User: hi",
           "Preference pairs have", "Merging two models", "The reference text", "Say hi"]
FAST = {"max_new_tokens": 5, "batch_size": 8}


@pytest.fixture(scope="module")
def fam(zoo):
    """θ₀ (bf16, 4 layers), one intermediate and θ_T."""
    sft = zoo.base("groups_sft", hidden=64, seed=21, layers=4)
    mid = zoo.relative("groups_mid", sft, seed=22, scale=0.02)
    return {"sft": sft, "mid": mid, "final": zoo.relative("groups_final", mid, seed=23)}


@pytest.fixture
def files(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "the helpful assistant answers the question"}) + "\n"
                     + json.dumps({"prompt": "Say hi", "completion": " Hello there"}) + "\n")
    return {"prompts": prompts, "texts": texts}


def expo(fam, *models, **parameters) -> dict:
    return {"merge_method": "expo", "base_model": str(fam["sft"]),
            "models": [{"model": str(m)} for m in models], "parameters": parameters}


def length_score(prompt: str, response: str) -> float:
    """A scorer given by file path: longer answers score higher."""
    return float(len(response))


def test_filters_follow_mergekit_substring_rule_and_bands_are_exact():
    from mergekit.config import ConditionalParameter, evaluate_setting

    names = [f"model.layers.{i}.{part}" for i in range(12) for part in
             ("self_attn.q_proj.weight", "mlp.up_proj.weight", "post_attention_layernorm.weight")]
    names += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    groups = build_groups(["modules"], 3, 12)
    assignment = assign(groups, names)
    # norms come first: post_attention_layernorm is a norm, not attention
    assert assignment["model.layers.1.post_attention_layernorm.weight"] == "norms.layers_0-3"
    assert assignment["model.layers.10.self_attn.q_proj.weight"] == "attention.layers_8-11"
    assert assignment["model.norm.weight"] == "norms"  # not in any layer band
    assert assignment["lm_head.weight"] == "embeddings_head"
    values = {g: float(i) / 4 for i, g in enumerate(sorted(set(assignment.values())))}
    entries = render(groups, assignment, values)
    setting = [ConditionalParameter(**e) for e in entries]
    for name, group in assignment.items():  # mergekit's own resolver gives every tensor its α
        assert evaluate_setting(name, setting, 0.0, validate=float) == values[group], name
    # a layer-1 filter must not catch layer 10 (substring rule): the trailing dot is kept
    assert all(not e["filter"].endswith(".1") for e in entries if "filter" in e)
    assert layer_bands(10, 3) == [(0, 1, 2, 3), (4, 5, 6), (7, 8, 9)]
    # plain filter groups are written as given, in order, with a catch-all for the rest
    custom = [Group("attn", ("self_attn.",))]
    plain = assign(custom, names)
    assert plain["model.norm.weight"] == OTHER
    assert render(custom, plain, {"attn": 0.5, OTHER: 0.25}) == [
        {"filter": "self_attn.", "value": 0.5}, {"value": 0.25}]
    # "*" matches every tensor in mergekit, so a later group gets nothing
    star = [Group("all", ("*",)), Group("attn", ("self_attn.",))]
    assert set(assign(star, names).values()) == {"all"}


def test_best_yml_per_group_reproduces_the_candidate_bit_for_bit(fam, tmp_path):
    config = {**expo(fam, fam["mid"], fam["final"], alpha=0.0, **{"lambda": 0.0})}
    search = load_search_config(write_config(tmp_path / "c.yml", config))
    weights = CandidateWeights(search, need_intermediates=True, progress=False)
    groups = build_groups(["modules"], 2, 4)
    names = [t.name for t in weights.targets]
    assignment = assign(groups, names)
    used = sorted(set(assignment.values()))
    # dyadic α and λ: the float64 formula is then exact, so mergekit must equal it rounded once
    values = {g: [0.25 * (i + 1), 0.125 * (i % 3)] for i, g in enumerate(used)}
    grouped = GroupedWeights(weights, assignment)
    grouped.set({g: tuple(v) for g, v in values.items()})
    best = grouped_config(search, groups, assignment, values, with_lambda=True)
    text = yaml.safe_dump(best, sort_keys=False)  # as best.yml is written and read back
    merged = load(run_merge_in_process(yaml.safe_load(text), tmp_path / "merged"))
    ours = weights.state_dict()
    theta0, mid, final = load(fam["sft"]), load(fam["mid"]), load(fam["final"])
    assert set(ours) == set(merged)
    for name, tensor in merged.items():
        assert torch.equal(ours[name], tensor), name
        alpha, lam = values[assignment[name]]
        expected = formula64(theta0[name], final[name], [mid[name]], alpha=alpha, lam=lam)
        assert torch.equal(tensor, expected.to(tensor.dtype)), name
    # the groups really differ: two tensors of one layer with their own α
    assert values[assignment["model.layers.3.mlp.up_proj.weight"]] != values[
        assignment["model.layers.3.self_attn.q_proj.weight"]]


def test_changing_one_group_rewrites_only_its_tensors(fam, tmp_path):
    search = load_search_config(write_config(tmp_path / "c.yml", expo(fam, fam["final"])))
    weights = CandidateWeights(search, progress=False)
    assignment = assign(build_groups(["modules"], None, 4), [t.name for t in weights.targets])
    grouped = GroupedWeights(weights, assignment)
    values = grouped.uniform(0.5, 0.0)
    assert grouped.set(values) == len(grouped.groups)
    assert grouped.set(values) == 0  # nothing changed, nothing written
    # mark every tensor, then move one group: only that group's tensors may be overwritten
    for target in weights.targets:
        target.parameter.data.fill_(7.0)
    assert grouped.set({**values, "mlp": (1.5, 0.0)}) == 1
    theta0, final = load(fam["sft"]), load(fam["final"])
    mlp = {n for n, g in assignment.items() if g == "mlp"}
    assert mlp and len(mlp) < len(weights.targets)
    for target in weights.targets:
        data = target.parameter.data
        if target.name in mlp:
            expected = formula64(theta0[target.name], final[target.name], alpha=1.5)
            assert torch.equal(data, expected.to(data.dtype)), target.name
        else:
            assert bool((data == 7.0).all()), f"{target.name} was rewritten"


def settings(config, out, files, **extra) -> SearchSettings:
    spec = {"kind": "callable", "function": f"{Path(__file__).resolve()}:length_score"}
    return SearchSettings.model_validate({
        "config": config, "out_dir": out, "alphas": [0.0, 2.0, 8.0, 32.0],
        "prompts": files["prompts"], "scorer": spec, "sampling": FAST, "progress": False,
        "guard": f"loglik:{files['texts']}", **extra,
    })


def test_guard_constraint_trials_resume_and_holdout(fam, tmp_path, files):
    config = write_config(tmp_path / "c.yml", expo(fam, fam["final"], alpha=0.3))
    out = tmp_path / "search"
    free = run_search(settings(config, out, files))
    rows = [r for r in free.rows if r["mean"] is not None]
    assert all(r["guard_mean"] is not None for r in rows)
    assert free.rows[0]["guard_drop"] == 0  # α = 0 is the baseline
    top = free.winner
    assert top["guard_drop"] > 0, "the unconstrained winner must cost some guard"
    eps = top["guard_drop"] / 2
    guarded = run_search(settings(config, out, files, max_guard_drop=eps))
    assert guarded.evaluated == 0  # ε is not part of the key: every score is reused
    assert guarded.winner["guard_drop"] <= eps and guarded.winner["mean"] < top["mean"]
    feasible = [r for r in guarded.rows if r["mean"] is not None and r["guard_drop"] <= eps]
    assert guarded.winner["mean"] == max(r["mean"] for r in feasible)
    best = yaml.safe_load((out / "best.yml").read_text())
    assert best["parameters"]["alpha"] == guarded.winner["alpha"]
    assert (out / "guard.png").read_bytes()[:4] == b"\x89PNG"

    # per-group trials through the command line, with a hold-out split; then a re-run
    command = ["search", str(config), str(out), "--alpha", "0,2,8,32", "--prompts",
               str(files["prompts"]), "--scorer", f"{Path(__file__).resolve()}:length_score",
               "--max-new-tokens", "5", "--batch-size", "8", "--no-progress",
               "--guard", f"loglik:{files['texts']}", "--groups", "attention",
               "--groups", "mlp", "--trials", "3", "--holdout-fraction", "0.25"]
    first = CliRunner().invoke(main, command)
    assert first.exit_code == 0, first.output
    assert "trial 2 (" in first.output and "hold-out" in first.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    trials = [r for r in lines if r.get("groups") is not None]
    assert len(trials) == 3 and {tuple(sorted(r["groups"])) for r in trials} == {
        ("attention", "mlp", OTHER)}
    holdout = [json.loads(x) for x in (out / "holdout.jsonl").read_text().splitlines()]
    assert holdout and all(r["n"] == 2 for r in holdout)  # 25 % of 8 prompts
    searched = [r for r in lines[-7:] if r.get("groups") is None]
    assert all(r["n"] == 6 for r in searched)
    again = run_search(settings(config, out, files, groups=["attention", "mlp"], trials=3,
                                holdout_fraction=0.25))
    assert again.evaluated == 0 and [r["groups"] for r in again.trials] == [
        r["groups"] for r in trials]
    assert again.holdout[0]["holdout_n"] == 2 and again.holdout[0]["search_n"] == 6
    assert len((out / "results.jsonl").read_text().splitlines()) == len(lines)



def test_holdout_line_once_when_the_winner_is_the_best_uniform(fam, tmp_path, files):
    """A uniform grid's winner is its best uniform candidate: one hold-out line, not two."""
    config = write_config(tmp_path / "c.yml", expo(fam, fam["final"], alpha=0.3))
    command = ["search", str(config), str(tmp_path / "search"), "--alpha", "0,8",
               "--prompts", str(files["prompts"]), "--scorer",
               f"{Path(__file__).resolve()}:length_score", "--max-new-tokens", "3",
               "--batch-size", "8", "--no-progress", "--holdout-fraction", "0.25"]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    held = [line for line in result.output.splitlines() if "hold-out" in line]
    assert len(held) == 1 and "winner = best uniform: search" in held[0], held

def test_loglik_guard_equals_an_unbatched_computation(fam, tmp_path, files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_expo.search.capability import parse_guard

    search = load_search_config(write_config(tmp_path / "c.yml", expo(fam, fam["final"])))
    weights = CandidateWeights(search, progress=False)
    weights.apply(0.0, 0.0)
    tokenizer = AutoTokenizer.from_pretrained(fam["final"])
    guard = parse_guard(f"loglik:{files['texts']}", batch_size=2)
    guard.prepare(tokenizer, False, progress=False)
    got = guard.score(weights.model, None, None, progress=False).values
    model = AutoModelForCausalLM.from_pretrained(fam["final"], dtype=torch.bfloat16).eval()
    expected = []
    for text, start in (("the helpful assistant answers the question", None),
                        ("Say hi", " Hello there")):
        head = tokenizer(text)["input_ids"]
        ids = head + (tokenizer(start, add_special_tokens=False)["input_ids"] if start else [])
        begin = len(head) if start else 1
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        picked = [float(logits[t - 1, ids[t]]) for t in range(begin, len(ids))]
        expected.append(sum(picked) / len(picked))
    assert got == pytest.approx(expected, abs=1e-5)
    assert all(math.isfinite(v) and v < 0 for v in got)


def test_response_guards_and_settings_refusals(tmp_path, files):
    from pydantic import ValidationError

    from mergekit_expo.search.capability import ResponseGuard, make_guard, pick_guarded_winner
    from mergekit_expo.search.merge_config import SearchConfigError
    from mergekit_expo.search.prompts import read_pairs
    from mergekit_expo.search.scorers import CallableScorer, DpoAccuracyScorer

    spec = f"{Path(__file__).resolve()}:length_score"
    guard = make_guard(settings(tmp_path / "c.yml", tmp_path, files, guard=spec),
                       CallableScorer(spec))
    assert isinstance(guard, ResponseGuard)
    guard.prepare(None, False)
    assert guard.score(None, ["p", "q"], ["abc", ""], progress=False).values == [3.0, 0.0]
    dpo = settings(tmp_path / "c.yml", tmp_path, files, guard=spec)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Say hi", "chosen": "Hello", "rejected": "no"}) + "\n")
    scorer = DpoAccuracyScorer(read_pairs(pairs), pairs, beta=0.1)
    with pytest.raises(SearchConfigError, match="use --guard loglik"):
        make_guard(dpo, scorer)
    # infeasible rows never win, even with the highest reward; failed rows neither
    rows = [{"mean": 5.0, "feasible": False}, {"mean": 2.0, "feasible": True},
            {"mean": None}, {"mean": 1.0, "feasible": True}]
    assert pick_guarded_winner(rows) is rows[1]
    for bad, message in (({"trials": 3}, "give --groups"), ({"max_guard_drop": 0.1,
                         "guard": None}, "needs a --guard"),
                         ({"holdout_fraction": 0.2, "holdout_prompts": files["prompts"]},
                          "not both")):
        with pytest.raises(ValidationError, match=message):
            settings(tmp_path / "c.yml", tmp_path, files, **bad)


def test_module_presets_write_only_filters_that_match_and_the_merge_takes_them(fam, tmp_path):
    """``--groups modules``: best.yml used to carry every preset filter (``ln_``,
    ``attention.``, ``feed_forward.``…), which the merge refuses as matching no tensor."""
    from mergekit_expo.search.merge_config import values_by_tensor, verify_best

    search = load_search_config(write_config(tmp_path / "c.yml", expo(fam, fam["final"])))
    names = list(search.working_dtypes())
    groups = build_groups(["modules"], None, 4)
    assignment = assign(groups, names)
    used = sorted(set(assignment.values()))
    values = {g: [0.25 * (i + 1), 0.0] for i, g in enumerate(used)}
    best = grouped_config(search, groups, assignment, values, with_lambda=False)
    written = [e["filter"] for e in best["parameters"]["alpha"] if "filter" in e]
    assert written and all(any(f in n for n in names) for f in written)
    assert "ln_" not in written and "feed_forward." not in written
    verify_best(search, best, values_by_tensor(assignment, {g: tuple(v) for g, v in
                                                             values.items()}))
    merged = load(run_merge_in_process(best, tmp_path / "merged"))
    theta0, final = load(fam["sft"]), load(fam["final"])
    for name, tensor in merged.items():
        alpha = values[assignment[name]][0]
        expected = formula64(theta0[name], final[name], alpha=alpha)
        assert torch.equal(tensor, expected.to(tensor.dtype)), name


def test_a_best_yml_that_would_not_give_the_scored_values_is_refused(fam, tmp_path):
    from mergekit_expo.search.merge_config import (
        SearchConfigError,
        best_config,
        values_by_tensor,
        verify_best,
    )

    search = load_search_config(write_config(tmp_path / "c.yml", expo(fam, fam["final"])))
    best = best_config(search, 0.5, 0.0)
    assignment = dict.fromkeys(search.working_dtypes(), "all")
    verify_best(search, best, values_by_tensor(assignment, {"all": (0.5, 0.0)}))
    with pytest.raises(SearchConfigError, match="scored with alpha = 0.4"):
        verify_best(search, best, values_by_tensor(assignment, {"all": (0.4, 0.0)}))


def test_write_best_into_a_file_is_refused_before_any_candidate(fam, tmp_path, files):
    from mergekit_expo.search.merge_config import SearchConfigError

    config = write_config(tmp_path / "c.yml", expo(fam, fam["final"]))
    blocker = tmp_path / "merged"
    blocker.write_text("not a folder")
    settings = SearchSettings.model_validate({
        "config": config, "out_dir": tmp_path / "search", "alphas": [0.2],
        "prompts": files["prompts"], "progress": False, "write_best": blocker,
        "scorer": {"kind": "callable", "function": "nonexistent_module:fn"}})
    with pytest.raises(SearchConfigError, match="exists and is not a folder"):
        run_search(settings)
    assert not (tmp_path / "search").exists()


def test_search_refuses_a_non_finite_alpha_in_the_config(fam, tmp_path):
    from mergekit_expo.search.merge_config import SearchConfigError

    path = write_config(tmp_path / "c.yml", expo(fam, fam["final"], alpha="inf"))
    with pytest.raises(SearchConfigError, match="must be finite"):
        load_search_config(path)
