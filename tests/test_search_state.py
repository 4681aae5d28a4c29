"""The search keeps its state to itself: after a search, torch's global RNG, ``sys.modules``,
transformers' progress bars and Optuna's verbosity are as they were before it (docs/layout.md),
while the same seed still gives the same responses."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import write_config
from transformers.utils import logging as hf_logging

from mergekit_expo.search.generation import (
    Sampler,
    bar_state,
    progress_bars,
    progress_bars_as_asked,
    restore_bars,
)
from mergekit_expo.search.run import run_search
from mergekit_expo.search.settings import SamplingSettings, SearchSettings

PROMPTS = ["The assistant answers the question", "Numbers 0 1 2 3", "A helpful answer is"]
FAST = {"max_new_tokens": 5, "batch_size": 2, "seed": 3}


@pytest.fixture(scope="module")
def pair(zoo):
    """θ₀ and θ_T, the same tiny checkpoints as tests/test_search.py's family (built once)."""
    sft = zoo.base("search_sft", hidden=64, seed=5)
    return sft, zoo.relative("search_it0", sft, seed=40, scale=0.02)


@pytest.fixture
def config(pair, tmp_path) -> Path:
    sft, final = pair
    return write_config(tmp_path / "c.yml", {
        "merge_method": "expo", "base_model": str(sft), "models": [{"model": str(final)}],
    })


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture
def scorer_file(tmp_path) -> Path:
    """A scorer by file path whose module needs itself in sys.modules while it is imported
    (a dataclass with string annotations)."""
    path = tmp_path / "state_scorer.py"
    path.write_text(textwrap.dedent("""
        from __future__ import annotations

        import dataclasses

        @dataclasses.dataclass
        class Weight:
            per_char: float = 1.0

        WEIGHT = Weight()

        def score(prompt: str, response: str) -> float:
            return WEIGHT.per_char * len(response)
    """))
    return path


@pytest.fixture
def hub_state():
    """transformers' and huggingface_hub's progress-bar state, put back after the test."""
    state = bar_state()
    yield bar_state
    restore_bars(state)


def search(config, prompts, scorer_file, out, alphas, **overrides) -> list[dict]:
    settings = SearchSettings.model_validate({
        "config": config, "out_dir": out, "prompts": prompts, "alphas": alphas,
        "scorer": {"kind": "callable", "function": f"{scorer_file}:score"},
        "sampling": FAST, "progress": False, "save_responses": True, "limit": 3, **overrides,
    })
    return run_search(settings).rows


def test_search_leaves_the_rng_and_sys_modules_and_repeats_its_responses(
    config, prompts, scorer_file, tmp_path
):
    torch.manual_seed(1234)
    rng = torch.random.get_rng_state()
    modules = set(sys.modules)

    first = search(config, prompts, scorer_file, tmp_path / "a", [0.1, 0.4])

    assert torch.equal(torch.random.get_rng_state(), rng)
    added = set(sys.modules) - modules
    assert not [n for n in added if n.startswith("_mergekit_expo_scorer") or "state_scorer" in n]
    assert not [m for m in list(sys.modules.values())
                if getattr(m, "__file__", None) == str(scorer_file)]
    assert [row["mean"] for row in first] == [
        float(sum(len(r) for r in row["responses"])) / len(PROMPTS) for row in first
    ]
    # the same seed gives the same responses, whatever the RNG was before and whichever
    # candidates came first (each candidate sees the same random numbers)
    torch.manual_seed(99)
    torch.rand(7)
    second = search(config, prompts, scorer_file, tmp_path / "b", [0.4, 0.1])
    assert [r["responses"] for r in second] == [r["responses"] for r in first][::-1]
    assert any(r.strip() for row in first for r in row["responses"])
    other_seed = search(config, prompts, scorer_file, tmp_path / "c", [0.1],
                        sampling={**FAST, "seed": 4})
    assert other_seed[0]["responses"] != first[0]["responses"]


def test_sampler_draws_what_torch_manual_seed_drew(pair):
    """The sampler draws the numbers a global ``torch.manual_seed(seed)`` gave
    (responses of a given seed are unchanged), and the caller's RNG continues undisturbed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pair[1]).eval()
    tokenizer = AutoTokenizer.from_pretrained(pair[1])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sampler = Sampler(model, tokenizer, PROMPTS, SamplingSettings(**FAST))

    with torch.random.fork_rng(devices=[]), torch.no_grad():  # what the sampler used to do
        torch.manual_seed(FAST["seed"])
        order = sampler.order
        batches = [order[i : i + FAST["batch_size"]] for i in range(0, len(order), 2)]
        expected = dict(zip(order, [r for b in batches for r in sampler._generate_batch(b)],
                            strict=True))

    torch.manual_seed(5)
    untouched = torch.rand(4)
    torch.manual_seed(5)
    assert sampler.generate(progress=False) == [expected[i] for i in range(len(PROMPTS))]
    assert sampler.generate(progress=False) == [expected[i] for i in range(len(PROMPTS))]
    assert torch.equal(torch.rand(4), untouched)


@pytest.mark.parametrize("enabled", [True, False], ids=["bars-on", "bars-off"])
def test_search_gives_back_the_progress_bar_state(
    enabled, config, prompts, scorer_file, tmp_path, hub_state, monkeypatch
):
    import transformers

    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    before = hub_state()
    during = []
    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained",
        lambda *a, **k: during.append(hf_logging.is_progress_bar_enabled()) or original(*a, **k),
    )

    search(config, prompts, scorer_file, tmp_path / "s", [0.2])

    assert during == [False]  # progress=False: quiet while the model loads
    assert hub_state() == before


def test_progress_bars_are_given_back_after_a_failed_load(hub_state):
    class Loader:
        @progress_bars_as_asked
        def __init__(self, *, progress: bool = True):
            self.saw = hf_logging.is_progress_bar_enabled()
            raise OSError("no such checkpoint")

    hf_logging.enable_progress_bar()
    before = hub_state()
    with pytest.raises(OSError, match="no such checkpoint"):
        Loader(progress=False)
    assert hub_state() == before
    with progress_bars(True):  # progress asked for: the caller's state is left as it is
        assert hub_state() == before
    hf_logging.disable_progress_bar()
    off = hub_state()
    with progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hub_state() == off


def test_reward_model_load_gives_back_the_progress_bar_state(pair, tmp_path, hub_state,
                                                             monkeypatch):
    import transformers
    from transformers import AutoTokenizer

    from mergekit_expo.demo.checkpoints import build_reward_model
    from mergekit_expo.search.scorers import RewardModelScorer

    path = build_reward_model(tmp_path / "rm", AutoTokenizer.from_pretrained(pair[0]),
                              hidden=32, layers=1, num_labels=1)
    during = []
    cls = transformers.AutoModelForSequenceClassification
    original = cls.from_pretrained
    monkeypatch.setattr(
        cls, "from_pretrained",
        lambda *a, **k: during.append(hf_logging.is_progress_bar_enabled()) or original(*a, **k),
    )
    hf_logging.enable_progress_bar()
    before = hub_state()
    RewardModelScorer(path).prepare(progress=False)
    assert during == [False] and hub_state() == before


def test_trials_give_back_optunas_verbosity():
    optuna = pytest.importorskip("optuna")

    from mergekit_expo.search.trials import TrialSpace, run_trials

    space = TrialSpace(groups=("a", "b"), alpha=(0.0, 1.0), lam=None, step=0.1)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        rows = run_trials(
            space, trials=3, seed=0, grid_rows=[], finished=[], lookup=lambda values: None,
            evaluate=lambda jobs: [{"mean": -abs(values["a"][0] - 0.3), "trial": number}
                                   for values, number in jobs],
        )
        assert len(rows) == 3
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(verbosity)
