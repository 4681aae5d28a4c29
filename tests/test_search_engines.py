"""``--engine vllm``: the engine's weights are the merge's, bit for bit (read back, fused
projections split again), and a search runs through it. One engine for the whole file, closed
when the file is done: an idle vLLM engine's worker keeps polling (CPU time the rest of the run
would pay), and closing it must end its processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_merge_in_process, write_config
from engines import PROMPTS, engine_processes, family_config, need
from reference import load


@pytest.fixture(scope="module")
def engine_weights(engine_family, tmp_path_factory):
    """The file's one vLLM engine, behind the search's candidate interface."""
    need("vllm")
    from mergekit_expo.search.merge_config import load_search_config
    from mergekit_expo.search.vllm_engine import EngineWeights

    path = write_config(tmp_path_factory.mktemp("engine") / "c.yml",
                        family_config(engine_family))
    weights, check_gone = engine_processes(lambda: EngineWeights(
        load_search_config(path), need_intermediates=True, progress=False,
        chunk_bytes=200_000))  # several chunks even for a tiny model
    yield weights
    weights.model.close()
    check_gone()


@pytest.mark.parametrize("alpha,lam", [(0.5, 0.4)])  # ExPO with θ̄: every kernel term
def test_engine_weights_equal_mergekit_yaml_bit_for_bit(engine_weights, engine_family, alpha,
                                                        lam, tmp_path):
    engine_weights.apply(alpha, lam)  # fingerprints checked inside, at every update
    held = engine_weights.model.read()
    config = family_config(engine_family, alpha=alpha, **{"lambda": lam})
    # mergekit's own merge, as `mergekit-yaml best.yml OUT --no-copy-tokenizer` runs it (in
    # this process: no 8 s import of mergekit in a new interpreter)
    merged = load(run_merge_in_process(config, tmp_path / "merged", copy_tokenizer=False))
    fused = {n for n in merged if any(p in n for p in ("q_proj", "k_proj", "v_proj",
                                                        "gate_proj", "up_proj"))}
    assert fused and set(merged) <= set(held)  # every merged tensor, fused ones included
    for name, tensor in merged.items():
        assert held[name].dtype == tensor.dtype, name
        assert torch.equal(held[name], tensor), (alpha, lam, name)


def test_a_tampered_engine_weight_is_caught_by_the_fingerprint(engine_weights):
    from mergekit_expo.search.vllm_engine import EngineMismatch

    engine_weights.apply(0.2, 0.0)
    name = "model.layers.0.self_attn.k_proj.weight"
    tensor = engine_weights.model.read([name])[name]
    engine_weights.model.load([(name, tensor + 1)])  # behind the candidate interface's back
    with pytest.raises(EngineMismatch, match="holds other values"):
        engine_weights.check([name])


def test_search_with_the_vllm_engine_samples_per_candidate_and_repeats(
        engine_weights, engine_family, tmp_path, monkeypatch):
    from mergekit_expo.search import vllm_engine
    from mergekit_expo.search.run import run_search
    from mergekit_expo.search.settings import SearchSettings

    # the file's running engine stands in for a new one (same model, dtype and options)
    monkeypatch.setattr(vllm_engine, "VllmEngine", lambda *a, **k: engine_weights.model)
    config = write_config(tmp_path / "c.yml", family_config(engine_family))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "score_mod.py").write_text(
        "def score(prompt, response):\n    return float(len(set(response.split())))\n")

    def search(out):
        return run_search(SearchSettings.model_validate({
            "config": config, "out_dir": tmp_path / out, "alphas": [0.0, 0.3, 64.0],
            "lambdas": [0.5], "prompts": prompts, "progress": False, "engine": "vllm",
            "scorer": {"kind": "callable", "function": f"{tmp_path / 'score_mod.py'}:score"},
            "sampling": {"max_new_tokens": 8, "temperature": 0.7, "seed": 3},
            "save_responses": True,
        }))

    first, again = search("a"), search("b")
    responses = [row["responses"] for row in first.rows]
    assert len(responses) == 3 and all(len(r) == len(PROMPTS) for r in responses)
    assert responses == [row["responses"] for row in again.rows]  # same seed, same samples
    assert responses[0] != responses[2]  # α = 64 generates from other weights than α = 0
    assert all(0 < row["update_seconds"] for row in first.rows)
    key = json.loads((tmp_path / "a" / "results.jsonl").read_text().splitlines()[0])["settings"]
    assert key["engine"]["name"] == "vllm"


def test_worked_example_runs_with_the_vllm_engine_as_documented(
        engine_weights, search_example, tmp_path, monkeypatch):
    """docs/search.md's ``--engine vllm`` command, word for word (in this test's folder, on
    the file's engine, which holds the same θ_T in the same dtype)."""
    import shlex

    from click.testing import CliRunner

    from mergekit_expo.cli import main
    from mergekit_expo.search import vllm_engine

    docs = (Path(__file__).resolve().parents[1] / "docs" / "search.md").read_text()
    (command,) = [" ".join(block.replace("\\\n", " ").split()) for block in
                  docs.split("```bash\n")[1:] if "--engine vllm" in block.split("```")[0]]
    command = command.split("```")[0].replace("/tmp/expo-example", str(tmp_path / "example"))
    import shutil

    shutil.copytree(search_example, tmp_path / "example")
    monkeypatch.setattr(vllm_engine, "VllmEngine", lambda *a, **k: engine_weights.model)
    words = shlex.split(command)
    assert words[:2] == ["mergekit-expo", "search"]
    result = CliRunner().invoke(main, words[1:], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Best: alpha = " in result.output
    rows = [json.loads(r) for r in (tmp_path / "example" / "search-vllm" / "results.jsonl")
            .read_text().splitlines()]
    assert sorted(r["alpha"] for r in rows) == [0, 0.5, 1, 2, 4, 8, 16]
    assert all(r["settings"]["engine"]["name"] == "vllm" for r in rows)


def test_what_the_vllm_engine_cannot_score_is_refused_before_it_starts(engine_family, tmp_path,
                                                                        monkeypatch):
    """No engine needed: these refusals come first (docs/failures.md)."""
    from mergekit_expo.search.capability import LogLikelihoodGuard
    from mergekit_expo.search.merge_config import SearchConfigError, load_search_config
    from mergekit_expo.search.scorers import CallableScorer, DpoAccuracyScorer
    from mergekit_expo.search.settings import SearchSettings, parse_options
    from mergekit_expo.search.vllm_engine import engine_weights, resolve_engine

    search = load_search_config(write_config(tmp_path / "c.yml", family_config(engine_family)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    settings = SearchSettings.model_validate({"config": tmp_path / "c.yml", "out_dir": tmp_path,
                                              "scorer": {"kind": "dpo", "pairs": pairs}})
    with pytest.raises(SearchConfigError, match="the DPO scorer .* needs --engine hf"):
        engine_weights(settings, search, DpoAccuracyScorer([], pairs, beta=0.1), None,
                       need_intermediates=False)
    (tmp_path / "s.py").write_text("def f(prompt, response):\n    return 0.0\n")
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(SearchConfigError, match="this --guard scores with a transformers model"):
        engine_weights(settings, search, CallableScorer(f"{tmp_path}/s.py:f"),
                       LogLikelihoodGuard(texts), need_intermediates=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # as where vLLM is not installed
    with pytest.raises(SearchConfigError, match="vLLM is not installed; pip install"):
        resolve_engine("vllm", "cpu")
    assert resolve_engine("auto", "cuda") == "hf" and resolve_engine("auto", "cpu") == "hf"
    with pytest.raises(ValueError, match="--lm-eval-args 'x': write key=value"):
        parse_options("limit=2,x", "--lm-eval-args")
    assert parse_options("limit=2,include_path=/a b", "--x") == {"limit": 2,
                                                                 "include_path": "/a b"}


def test_the_engine_generates_with_the_weights_loaded(engine_weights, engine_family):
    """Every linear layer zeroed in place: the answers must change (vLLM repacks a CPU linear
    weight after loading; a stale packed copy would keep answering as before)."""
    from mergekit_expo.search.generation import load_tokenizer
    from mergekit_expo.search.settings import SamplingSettings
    from mergekit_expo.search.vllm_engine import VllmSampler

    tokenizer = load_tokenizer(engine_weights.search)
    sampler = VllmSampler(engine_weights.model, tokenizer, PROMPTS,
                          SamplingSettings(max_new_tokens=6, temperature=0.7, seed=1))
    engine_weights.apply(0.0, 0.0)
    before = [r.text for r in sampler.generate(progress=False)]
    assert before == [r.text for r in sampler.generate(progress=False)]  # seeded: repeatable
    held = engine_weights.model.read()
    engine_weights.model.load([(n, t * 0) for n, t in held.items() if n.endswith("proj.weight")])
    engine_weights.model.reset_cache()
    after = [r.text for r in sampler.generate(progress=False)]
    engine_weights.apply(0.0, 0.0)
    assert after != before
    assert [r.text for r in sampler.generate(progress=False)] == before


def test_lm_eval_scores_and_guards_on_the_running_engine_as_on_transformers(
        engine_weights, engine_family, tmp_path, monkeypatch):
    """``--scorer``/``--guard lm-eval:TASKS`` with ``--engine vllm``: lm-eval's vLLM model class
    runs on the file's engine (no model written, no second engine), and every document's
    accuracy equals lm-eval's on the transformers model of the same candidate."""
    need("lm_eval")
    from engines import write_local_task

    from mergekit_expo.search import vllm_engine
    from mergekit_expo.search.candidates import CandidateWeights
    from mergekit_expo.search.generation import load_tokenizer
    from mergekit_expo.search.lm_eval_guard import LmEvalTasks
    from mergekit_expo.search.merge_config import load_search_config
    from mergekit_expo.search.run import run_search
    from mergekit_expo.search.settings import SearchSettings

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    started = []
    monkeypatch.setattr(vllm_engine, "VllmEngine",
                        lambda *a, **k: started.append(1) or engine_weights.model)
    config = write_config(tmp_path / "c.yml", family_config(engine_family))
    tasks = {"include_path": str(write_local_task(tmp_path / "tasks"))}
    report = run_search(SearchSettings.model_validate({
        "config": config, "out_dir": tmp_path / "out", "alphas": [0.0, 1.0], "progress": False,
        "engine": "vllm", "scorer": {"kind": "lm_eval", "tasks": "expo_local"},
        "guard": "lm-eval:expo_local", "lm_eval_args": tasks}))
    assert started == [1]  # one engine for the search, lm-eval included
    assert not list((tmp_path / "out").glob("**/*.safetensors"))
    search = load_search_config(config)
    weights = CandidateWeights(search, progress=False)
    on_hf = LmEvalTasks("expo_local", tasks, flag="--scorer", batch_size=8)
    tokenizer = load_tokenizer(search, side="left")
    for row in report.rows:
        weights.apply(row["alpha"], row["lambda"])
        expected = on_hf.run(weights.model, tokenizer).values
        assert row["scores"] == expected, row["alpha"]
        assert row["guard_mean"] == row["mean"]
