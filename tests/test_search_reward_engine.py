"""``--reward-engine vllm``: the reward model in a vLLM pooling engine scores as transformers'
classifier does. A file of its own, so that each engine lives only as long as its file and
the two files can run on different pytest-xdist workers."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import write_config
from engines import PROMPTS, engine_processes, family_config, need

REWARD_TOLERANCE = 1e-5  # float32 logits; docs/search.md, "At scale"


@pytest.fixture(scope="module")
def vllm_reward(search_example, tmp_path_factory):
    """A tiny float32 reward model (head_dim 32) served by one vLLM pooling engine."""
    need("vllm")
    from transformers import AutoTokenizer

    from mergekit_expo.demo.checkpoints import build_reward_model
    from mergekit_expo.search.vllm_reward import VllmRewardScorer

    tokenizer = AutoTokenizer.from_pretrained(search_example / "sft")
    path = build_reward_model(tmp_path_factory.mktemp("rm") / "rm", tokenizer, hidden=64,
                              layers=2, heads=2)
    scorer = VllmRewardScorer(path)
    _, check_gone = engine_processes(lambda: scorer.prepare(progress=False))
    yield scorer
    scorer.close()
    check_gone()


def test_the_reward_model_in_vllm_scores_as_transformers_does(vllm_reward, engine_family,
                                                              tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mergekit_expo.cli import main
    from mergekit_expo.search import vllm_reward as module
    from mergekit_expo.search.scorers import RewardModelScorer

    hf = RewardModelScorer(vllm_reward.path)
    pad = vllm_reward.tokenizer.pad_token
    responses = ["yes", "", "a much longer answer, " * 20, f"ends with padding{pad}{pad}"]
    expected = hf.score(PROMPTS, responses, progress=False).values
    got = vllm_reward.score(PROMPTS, responses, progress=False).values
    assert got == pytest.approx(expected, abs=REWARD_TOLERANCE, rel=0)
    assert len(set(got)) == len(got)

    # a search with --reward-engine vllm scores with it (the file's engine stands in for
    # the one it would start: same model)
    monkeypatch.setattr(module, "VllmRewardScorer", lambda path, **k: vllm_reward)
    config = write_config(tmp_path / "c.yml", family_config(engine_family))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    result = CliRunner().invoke(main, [
        "search", str(config), str(tmp_path / "s"), "--engine", "hf", "--alpha", "0.5",
        "--reward-model", str(vllm_reward.path), "--reward-engine", "vllm", "--prompts",
        str(prompts), "--max-new-tokens", "4", "--save-responses", "--no-progress"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(r) for r in (tmp_path / "s" / "results.jsonl").read_text().splitlines()]
    assert row["settings"]["scorer"]["engine"] == "vllm"
    expected = hf.score(PROMPTS, row["responses"], progress=False).values
    assert row["scores"] == pytest.approx(expected, abs=REWARD_TOLERANCE, rel=0)


def test_reward_engine_vllm_is_refused_without_vllm_or_a_reward_model(engine_family, tmp_path,
                                                                      monkeypatch):
    """No engine needed (docs/failures.md)."""
    from click.testing import CliRunner

    from mergekit_expo.cli import main
    from mergekit_expo.search.merge_config import SearchConfigError
    from mergekit_expo.search.vllm_reward import VllmRewardScorer

    config = write_config(tmp_path / "c.yml", family_config(engine_family))
    result = CliRunner().invoke(main, ["search", str(config), str(tmp_path / "s"), "--scorer",
                                       "m:f", "--reward-engine", "vllm"])
    assert result.exit_code == 2 and "--reward-engine applies to --reward-model only" in (
        result.output)
    monkeypatch.setitem(sys.modules, "vllm", None)  # as where vLLM is not installed
    with pytest.raises(SearchConfigError, match="--reward-engine vllm: vLLM is not installed"):
        VllmRewardScorer(tmp_path)
