"""The α/λ search on tiny local checkpoints: in-place candidates equal real merges, the three
scorers give the numbers an independent computation gives, resume, errors, the winner."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import run_merge_in_process, write_config
from reference import load

from mergekit_expo.cli import main
from mergekit_expo.search.candidates import CandidateWeights
from mergekit_expo.search.generation import Sampler, load_tokenizer
from mergekit_expo.search.merge_config import SearchConfigError, load_search_config
from mergekit_expo.search.prompts import JsonlError, read_pairs, read_prompts
from mergekit_expo.search.results import ResultsFile
from mergekit_expo.search.run import pick_winner, run_search
from mergekit_expo.search.scorers import ScorerError
from mergekit_expo.search.settings import SamplingSettings, SearchSettings, parse_grid

PROMPTS = [
    "The assistant answers the question",
    "User: how do I merge two models? Assistant:",
    "A helpful answer is",
    "Numbers 0 1 2 3",
    "Preference pairs have",
]
FAST = {"max_new_tokens": 6, "batch_size": 4}


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(zoo):
    """θ₀ (bf16, hidden 64) and four successive aligned relatives: θ₁, θ₂, θ₃, θ_T."""
    sft = zoo.base("search_sft", hidden=64, seed=5)
    steps, previous = [], sft
    for index in range(4):
        previous = zoo.relative(f"search_it{index}", previous, seed=40 + index, scale=0.02)
        steps.append(previous)
    return {"sft": sft, "iterates": steps[:-1], "final": steps[-1]}


@pytest.fixture(scope="module")
def family32(zoo):
    """A float32 pair, for scorers whose numbers are compared with an independent computation."""
    sft = zoo.base("search_sft32", hidden=64, seed=6, dtype=torch.float32)
    return {"sft": sft, "final": zoo.relative("search_dpo32", sft, seed=50, scale=0.05)}


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)]
    path.write_text("".join(lines))
    return path


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    """A scorer importable as ``search_scorer_mod:score`` that records its calls."""
    (tmp_path / "search_scorer_mod.py").write_text(textwrap.dedent("""
        CALLS = []

        def score(prompt, response):
            CALLS.append((prompt, response))
            return float(len(set(response.split()))) - 0.01 * len(response)

        def broken(prompt, response):
            return "high"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import search_scorer_mod

    importlib.reload(search_scorer_mod)
    return search_scorer_mod


def expo(base, *models, **parameters) -> dict:
    config = {
        "merge_method": "expo",
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
    }
    if parameters:
        config["parameters"] = parameters
    return config


def settings(config_path, out_dir, **overrides) -> SearchSettings:
    values = {
        "config": config_path,
        "out_dir": out_dir,
        "alphas": [0.1, 0.3, 0.5],
        "sampling": FAST,
        "progress": False,
        **overrides,
    }
    return SearchSettings.model_validate(values)


# -- in-place candidates are the merge -----------------------------------------------------


CASES = {
    "expo-bf16": (lambda f: expo(f["sft"], f["final"]), [(0.3, 0.0), (1.7, 0.0)]),
    "iterative-bf16": (
        lambda f: expo(f["sft"], *f["iterates"][:2], f["final"]),
        [(0.4, 0.3), (25.0, 0.2), (0.3, 1.0)],
    ),
    # inputs cast to float32, three intermediates, rounded twice as mergekit does
    "iterative-fp32-to-bf16": (
        lambda f: {**expo(f["sft"], *f["iterates"], f["final"]), "dtype": "float32",
                   "out_dtype": "bfloat16"},
        [(0.5, 0.3)],
    ),
    # final: true picks θ_T out of list order
    "final-flag": (
        lambda f: {**expo(f["sft"], f["final"], f["iterates"][0]),
                   "models": [{"model": str(f["final"]), "parameters": {"final": True}},
                              {"model": str(f["iterates"][0])}]},
        [(0.3, 0.5)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_candidate_weights_equal_a_real_merge_bit_for_bit(case, family, tmp_path):
    make_config, candidates = CASES[case]
    config = make_config(family)
    path = write_config(tmp_path / "c.yml", config)
    search = load_search_config(path)
    streamed = CandidateWeights(search, need_intermediates=True, progress=False)
    # the same inputs copied onto the model's device ("cpu" here: the --device cuda code path)
    resident = CandidateWeights(
        search, need_intermediates=True, progress=False, inputs_on_device="yes"
    )
    assert not streamed.resident and resident.resident
    if case == "iterative-fp32-to-bf16":
        # streamed: the three intermediates stay as read (mapped bf16, cast to float32 one tensor
        # at a time per candidate), never averaged up front
        assert [t.dtype for t in streamed.targets[0].intermediates] == [torch.bfloat16] * 3
        # resident: θ̄ held once in float64, where that is smaller than three float32 copies
        assert [t.dtype for t in resident.targets[0].intermediates] == [torch.float64]
    for alpha, lam in candidates:
        merged = load(run_merge_in_process(
            {**config, "parameters": {"alpha": alpha, "lambda": lam}}, tmp_path / f"m{alpha}-{lam}"
        ))
        for weights in (streamed, resident):
            weights.apply(alpha, lam)
            assert weights.update_seconds > 0
            ours = weights.state_dict()
            assert set(ours) == set(merged)
            for name, tensor in merged.items():
                assert ours[name].dtype == tensor.dtype, name
                assert torch.equal(ours[name], tensor), (case, alpha, lam, weights.resident, name)


def test_resident_inputs_that_do_not_fit_are_refused_or_streamed(family, tmp_path, monkeypatch):
    from mergekit_expo.search import candidates

    config = expo(family["sft"], *family["iterates"], family["final"])
    search = load_search_config(write_config(tmp_path / "c.yml", config))
    monkeypatch.setattr(candidates, "free_device_bytes", lambda device: 10_000_000)
    with pytest.raises(SearchConfigError, match=r"inputs-on-device yes: .* need 0\.\d+ GB on cpu.*"
                       r"free memory there is 0\.01 GB.*--inputs-on-device no"):
        CandidateWeights(search, need_intermediates=True, progress=False, inputs_on_device="yes")
    # auto keeps host inputs mapped on the CPU, whatever is free
    weights = CandidateWeights(search, need_intermediates=True, progress=False)
    assert not weights.resident
    assert all(not t.reference.is_floating_point() or t.reference.dtype == torch.bfloat16
               for t in weights.targets if t.reference is not None)


def test_candidate_decodes_exactly_like_the_merged_model_loaded_from_disk(family, tmp_path):
    from transformers import AutoModelForCausalLM

    config = expo(family["sft"], family["final"])
    search = load_search_config(write_config(tmp_path / "c.yml", config))
    weights = CandidateWeights(search, progress=False)
    weights.apply(0.5, 0.0)
    tokenizer = load_tokenizer(search)
    sampling = SamplingSettings(max_new_tokens=12, batch_size=3, seed=7)
    ours = Sampler(weights.model, tokenizer, PROMPTS, sampling).generate(progress=False)
    out = run_merge_in_process({**config, "parameters": {"alpha": 0.5}}, tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    theirs = Sampler(loaded, tokenizer, PROMPTS, sampling).generate(progress=False)
    assert ours == theirs
    assert sum(r.tokens for r in ours) > 0


# -- the search loop -----------------------------------------------------------------------


def test_search_scores_every_candidate_resumes_and_picks_the_argmax(
    family, tmp_path, prompts_file, scorer_module, monkeypatch
):
    import transformers

    loads = []
    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained",
        lambda *a, **k: loads.append(a) or original(*a, **k),
    )
    config = write_config(tmp_path / "c.yml", expo(family["sft"], family["final"], alpha=0.2))
    out = tmp_path / "search"
    run = settings(config, out, prompts=prompts_file,
                   scorer={"kind": "callable", "function": "search_scorer_mod:score"})
    report = run_search(run)

    assert len(loads) == 1  # one model load for the whole grid, nothing written but our files
    assert sorted(p.name for p in out.iterdir()) == ["best.yml", "results.jsonl", "search.png"]
    assert len(scorer_module.CALLS) == 3 * len(PROMPTS)
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["alpha"], r["lambda"]) for r in lines] == [(0.1, 0.0), (0.3, 0.0), (0.5, 0.0)]
    for row in lines:  # the summary is the scorer's numbers, recomputed here
        assert row["n"] == len(PROMPTS) == len(row["scores"]) == len(row["lengths"])
        assert row["mean"] == pytest.approx(sum(row["scores"]) / len(PROMPTS))
        assert row["mean_length_tokens"] == pytest.approx(sum(row["lengths"]) / len(PROMPTS))
        assert 0 < row["mean_length_tokens"] <= FAST["max_new_tokens"]
    best = max(lines, key=lambda r: r["mean"])
    assert report.winner["alpha"] == best["alpha"]
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    written = yaml.safe_load((out / "best.yml").read_text())
    assert written == {**yaml.safe_load(config.read_text()),
                       "parameters": {"alpha": best["alpha"]}}

    # a re-run with the same settings computes nothing; a larger grid computes only what is new
    scorer_module.CALLS.clear()
    again = run_search(run)
    assert again.skipped == 3 and not scorer_module.CALLS and len(loads) == 1
    assert again.rows == report.rows
    module_scorer = {"kind": "callable", "function": "search_scorer_mod:score"}
    bigger = run_search(settings(config, out, prompts=prompts_file, alphas=[0.1, 0.3, 0.5, 1.0],
                                 scorer=module_scorer))
    assert bigger.skipped == 3 and len(scorer_module.CALLS) == len(PROMPTS)
    # a changed sampling setting is a different key: nothing reused, old rows kept in the file
    scorer_module.CALLS.clear()
    reseeded = run_search(settings(config, out, prompts=prompts_file, alphas=[0.3],
                                   sampling={**FAST, "seed": 1}, scorer=module_scorer))
    assert reseeded.skipped == 0 and len(scorer_module.CALLS) == len(PROMPTS)
    assert len((out / "results.jsonl").read_text().splitlines()) == 5


def test_same_seed_same_responses_and_interrupted_row_is_redone(family, tmp_path, prompts_file):
    config = write_config(tmp_path / "c.yml", expo(family["sft"], family["final"]))
    spec = {"kind": "callable", "function": f"{Path(__file__).resolve()}:char_count"}
    first = run_search(settings(config, tmp_path / "a", prompts=prompts_file, alphas=[0.3, 0.6],
                                scorer=spec, save_responses=True))
    second = run_search(settings(config, tmp_path / "b", prompts=prompts_file, alphas=[0.6],
                                 scorer=spec, save_responses=True))
    assert first.rows[1]["responses"] == second.rows[0]["responses"]
    # a row cut short (run killed mid-write) is skipped with a warning and computed again
    results = tmp_path / "a" / "results.jsonl"
    text = results.read_text().splitlines()
    results.write_text(text[0] + "\n" + text[1][: len(text[1]) // 2])
    resumed = run_search(settings(config, tmp_path / "a", prompts=prompts_file,
                                  alphas=[0.3, 0.6], scorer=spec, save_responses=True))
    assert resumed.skipped == 1
    assert resumed.rows[1]["responses"] == first.rows[1]["responses"]
    lines = results.read_text().splitlines()
    assert json.loads(lines[-1])["alpha"] == 0.6


def char_count(prompt: str, response: str) -> float:
    """A scorer given by file path (path/to/file.py:function)."""
    return float(len(response))


def test_overflowing_candidate_is_recorded_and_never_wins(family, tmp_path, prompts_file):
    config = write_config(tmp_path / "c.yml", expo(family["sft"], family["final"]))
    spec = {"kind": "callable", "function": f"{Path(__file__).resolve()}:char_count"}
    report = run_search(settings(config, tmp_path / "o", prompts=prompts_file,
                                 alphas=[0.2, 1e42], scorer=spec))
    failed = report.rows[1]
    assert failed["mean"] is None and "overflows torch.bfloat16" in failed["error"]
    assert report.winner["alpha"] == 0.2


def test_write_best_runs_the_real_merge_for_the_winner(family, tmp_path, prompts_file):
    config = write_config(
        tmp_path / "c.yml", expo(family["sft"], family["iterates"][0], family["final"])
    )
    spec = {"kind": "callable", "function": f"{Path(__file__).resolve()}:char_count"}
    out = tmp_path / "best-model"
    report = run_search(settings(config, tmp_path / "s", prompts=prompts_file, alphas=[0.2, 0.6],
                                 lambdas=[0.0, 0.5], scorer=spec, write_best=out))
    winner = report.winner
    assert winner["mean"] == max(r["mean"] for r in report.rows)
    assert all(0 < r["update_seconds"] < r["seconds"] for r in report.rows)
    assert report.merged == out and (out / "config.json").exists()
    written = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert written["parameters"] == {"alpha": winner["alpha"], "lambda": winner["lambda"]}
    weights = CandidateWeights(load_search_config(config), need_intermediates=True, progress=False)
    weights.apply(winner["alpha"], winner["lambda"])
    merged = load(out)
    assert all(torch.equal(weights.state_dict()[k], v) for k, v in merged.items())


# -- the other two scorers -----------------------------------------------------------------


def build_reward_model(path: Path, tokenizer_source: Path, num_labels: int = 1) -> Path:
    """A tiny local Llama sequence classifier (float32) with the zoo's tokenizer."""
    from transformers import AutoTokenizer

    from mergekit_expo.demo.checkpoints import build_reward_model as build

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    return build(path, tokenizer, hidden=32, layers=1, num_labels=num_labels)


def test_reward_model_scores_equal_unbatched_scoring(family32, tmp_path, prompts_file):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = build_reward_model(tmp_path / "rm", family32["sft"])
    config = write_config(tmp_path / "c.yml", expo(family32["sft"], family32["final"]))
    report = run_search(settings(config, tmp_path / "s", prompts=prompts_file, alphas=[0.5],
                                 scorer={"kind": "reward_model", "path": str(rm)},
                                 save_responses=True, sampling={**FAST, "max_new_tokens": 10}))
    row = report.rows[0]
    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm)
    with torch.no_grad():
        expected = [
            float(model(**tokenizer(p, r, return_tensors="pt")).logits[0, 0])
            for p, r in zip(PROMPTS, row["responses"], strict=True)
        ]
    assert row["scores"] == pytest.approx(expected, abs=1e-5)
    assert len(set(row["scores"])) > 1

    two = build_reward_model(tmp_path / "rm2", family32["sft"], num_labels=2)
    with pytest.raises(ScorerError, match="num_labels = 1"):
        run_search(settings(config, tmp_path / "s2", prompts=prompts_file, alphas=[0.5],
                            scorer={"kind": "reward_model", "path": str(two)}))


def sequence_logp(model, tokenizer, prompt: str, response: str) -> float:
    """log π(response | prompt), one sequence at a time, no padding."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ids + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    picked = logps[torch.arange(len(targets)), targets]
    return float(picked[len(prompt_ids) - 1 :].sum())


def test_dpo_implicit_reward_accuracy_matches_an_independent_computation(family32, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pairs = tmp_path / "pairs.jsonl"
    texts = [
        ("The assistant", " answers the question politely.", " weights a little from"),
        ("User: how do I merge two models?", " Assistant: write a YAML config.", " 0 1 2 ("),
        ("Alignment moves", " the weights a little.", " the the the the"),
        ("A helpful answer is", " honest, harmless and to the point.", " ? ! ;"),
        ("Preference pairs have", " a prompt, a chosen and a rejected response.", " no"),
        ("Numbers", " 0 1 2 3 4 5", " Extrapolate along that move"),
    ]
    pairs.write_text("".join(
        json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in texts
    ))
    config = write_config(tmp_path / "c.yml", expo(family32["sft"], family32["final"]))
    beta = 0.25
    report = run_search(settings(config, tmp_path / "s", alphas=[0.0, 2.0],
                                 scorer={"kind": "dpo", "pairs": pairs, "beta": beta}))
    tokenizer = AutoTokenizer.from_pretrained(family32["final"])
    reference = AutoModelForCausalLM.from_pretrained(family32["sft"]).eval()
    for row in report.rows:
        merged = run_merge_in_process(
            {**expo(family32["sft"], family32["final"]), "parameters": {"alpha": row["alpha"]}},
            tmp_path / f"m{row['alpha']}",
        )
        policy = AutoModelForCausalLM.from_pretrained(merged).eval()
        margins = []
        for prompt, chosen, rejected in texts:
            reward = {
                y: beta * (sequence_logp(policy, tokenizer, prompt, y)
                           - sequence_logp(reference, tokenizer, prompt, y))
                for y in (chosen, rejected)
            }
            margins.append(reward[chosen] - reward[rejected])
        assert row["scores"] == [float(m > 0) for m in margins]
        assert row["mean"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
        assert row["mean_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
        assert row["mean_length_tokens"] is None
    assert report.rows[1]["mean_margin"] != 0


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('{"prompt": "a"}\n\n{"prompt": "b"\n', 3, "not valid JSON"),
        ('{"prompt": "a"}\n["b"]\n', 2, "a JSON list, not an object"),
        ('{"prompt": "a"}\n{"text": "b"}\n', 2, "missing key 'prompt'"),
        ('{"prompt": 3}\n', 1, "'prompt' must be a string"),
        ('{"prompt": "  "}\n', 1, "'prompt' is empty"),
    ],
)
def test_bad_prompts_file_names_the_line(tmp_path, text, line, problem):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(JsonlError, match=f"line {line}: {problem}") as error:
        read_prompts(path)
    assert error.value.line == line and str(path) in str(error.value)


def test_bad_pairs_file_names_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    path.write_text(good + "\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(JsonlError, match="line 2: missing key 'rejected'"):
        read_pairs(path)
    path.write_text(good + "\n" + good + "\n" + json.dumps({"prompt": "p", "chosen": "a",
                                                              "rejected": "a"}) + "\n")
    with pytest.raises(JsonlError, match="line 3: `chosen` and `rejected` are identical"):
        read_pairs(path)


def test_cli_search_runs_and_reports_bad_input_with_line(family, tmp_path, prompts_file,
                                                         scorer_module):
    config = write_config(tmp_path / "c.yml", expo(family["sft"], family["final"]))
    runner = CliRunner()
    base = ["search", str(config), str(tmp_path / "out"), "--scorer", "search_scorer_mod:score",
            "--max-new-tokens", "4", "--no-progress"]
    result = runner.invoke(main, [*base, "--alpha", "0.1:0.3:0.1", "--prompts", str(prompts_file)])
    assert result.exit_code == 0, result.output
    assert "Best: alpha = " in result.output and "best.yml" in result.output
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b",}\n')
    result = runner.invoke(main, [*base, "--prompts", str(bad)])
    assert result.exit_code == 1 and f"{bad}, line 2: not valid JSON" in result.output
    result = runner.invoke(main, [*base, "--prompts", str(bad), "--pairs", str(bad)])
    assert result.exit_code == 2 and "choose exactly one scorer" in result.output
    result = runner.invoke(main, [*base, "--prompts", str(prompts_file), "--top-p", "1.5"])
    assert result.exit_code == 2 and "top_p" in result.output
    result = runner.invoke(main, [*base[:4], "search_scorer_mod:broken", *base[5:],
                                  "--prompts", str(prompts_file), "--alpha", "0.9"])
    assert result.exit_code == 1 and (
        "Error: α = 0.9, λ = 0: search_scorer_mod:broken returned 'high' (str) for item 0; a "
        "scorer must return a number; 0 finished candidates kept in "
    ) in result.output


def test_configs_the_search_cannot_reproduce_are_refused(family, zoo, tmp_path, prompts_file):
    spec = {"kind": "callable", "function": f"{Path(__file__).resolve()}:char_count"}

    def attempt(config, **overrides):
        path = write_config(tmp_path / "c.yml", config)
        return run_search(settings(path, tmp_path / "o", prompts=prompts_file, scorer=spec,
                                   **overrides))

    sliced = {"merge_method": "expo", "base_model": str(family["sft"]), "slices": [
        {"sources": [{"model": str(m), "layer_range": [0, 2]}
                     for m in (family["sft"], family["final"])]}]}
    with pytest.raises(SearchConfigError, match="`slices:` configs are not supported"):
        attempt(sliced)
    with pytest.raises(SearchConfigError, match="tunes `merge_method: expo`"):
        attempt({**expo(family["sft"], family["final"]), "merge_method": "linear"})
    with pytest.raises(SearchConfigError, match="no intermediate checkpoint"):
        attempt(expo(family["sft"], family["final"]), lambdas=[0.0, 0.3])
    grown = zoo.relative("search_grown", family["sft"], seed=60, add_tokens=["<extra>"])
    with pytest.raises(SearchConfigError,
                       match="different shapes in different inputs: model.embed_tokens.weight"):
        attempt(expo(family["sft"], grown), alphas=[0.3])


def test_grid_parsing_winner_and_results_key(tmp_path):
    assert parse_grid(("0.1:0.5:0.1",)) == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert parse_grid(("0.1, 2", "25")) == [0.1, 2.0, 25.0]
    assert parse_grid(()) is None
    with pytest.raises(ValueError, match="not a multiple"):
        parse_grid(("0:1:0.3",))
    rows = [{"alpha": 0.1, "mean": 1.0}, None, {"alpha": 0.2, "mean": None},
            {"alpha": 0.3, "mean": 2.0}, {"alpha": 0.4, "mean": 2.0}]
    assert pick_winner(rows)["alpha"] == 0.3  # ties: first in grid order
    assert pick_winner([None, {"alpha": 1, "mean": None}]) is None
    results = ResultsFile(tmp_path / "r.jsonl", "k1")
    results.append({"alpha": 0.1, "lambda": 0.0, "mean": 1.0})
    assert ResultsFile(tmp_path / "r.jsonl", "k1").finished(0.1, 0) is not None
    other = ResultsFile(tmp_path / "r.jsonl", "k2")
    assert other.finished(0.1, 0) is None and other.other_rows == 1


def test_damaged_input_is_named_not_blamed_on_alpha(family, tmp_path, prompts_file):
    import shutil

    from safetensors.torch import load_file, save_file

    from mergekit_expo.merge.guards import NonFiniteError

    damaged = tmp_path / "damaged"
    shutil.copytree(family["final"], damaged)
    tensors = load_file(damaged / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    config = write_config(tmp_path / "c.yml", expo(family["sft"], damaged))
    spec = {"kind": "callable", "function": f"{Path(__file__).resolve()}:char_count"}
    run = settings(config, tmp_path / "d", prompts=prompts_file, alphas=[0.3], scorer=spec)
    with pytest.raises(NonFiniteError, match=f"up_proj.weight of model {damaged} has 1 non-finite"):
        run_search(run)
