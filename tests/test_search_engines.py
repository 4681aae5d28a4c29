"""``--engine vllm``: the engine's weights are the merge's, bit for bit (read back, fused
projections split again), and a search runs through it. One engine for the whole session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_config
from engines import need
from reference import load

PROMPTS = ["The assistant answers the question", "A helpful answer is", "Numbers 0 1 2 3",
           "User: how do I merge two models? Assistant:"]


@pytest.fixture(scope="session")
def engine_family(zoo):
    """θ₀ and two aligned relatives, bf16, head_dim 64 (vLLM's CPU attention needs ≥ 32)."""
    sft = zoo.base("engine_sft", hidden=128, heads=2, seed=7)
    first = zoo.relative("engine_it1", sft, seed=70, scale=0.02)
    final = zoo.relative("engine_final", first, seed=71, scale=0.02)
    return {"sft": sft, "iterates": [first], "final": final}


def family_config(family, **parameters) -> dict:
    config = {"merge_method": "expo", "base_model": str(family["sft"]),
              "models": [{"model": str(m)} for m in (*family["iterates"], family["final"])]}
    if parameters:
        config["parameters"] = parameters
    return config


@pytest.fixture(scope="session")
def engine_weights(engine_family, tmp_path_factory):
    """The session's one vLLM engine, behind the search's candidate interface."""
    need("vllm")
    from mergekit_expo.search.merge_config import load_search_config
    from mergekit_expo.search.vllm_engine import EngineWeights

    path = write_config(tmp_path_factory.mktemp("engine") / "c.yml",
                        family_config(engine_family))
    weights = EngineWeights(load_search_config(path), need_intermediates=True, progress=False,
                            chunk_bytes=200_000)  # several chunks even for a tiny model
    yield weights


@pytest.mark.parametrize("alpha,lam", [(0.3, 0.0), (0.5, 0.4)])
def test_engine_weights_equal_mergekit_yaml_bit_for_bit(engine_weights, engine_family, alpha,
                                                        lam, tmp_path):
    engine_weights.apply(alpha, lam)  # fingerprints checked inside, at every update
    held = engine_weights.model.read()
    config = write_config(tmp_path / "best.yml", family_config(engine_family, alpha=alpha,
                                                               **{"lambda": lam}))
    out = tmp_path / "merged"
    mergekit_yaml = Path(sys.executable).with_name("mergekit-yaml")  # the real CLI
    subprocess.run([str(mergekit_yaml), str(config), str(out), "--no-copy-tokenizer"],
                   check=True, capture_output=True)
    merged = load(out)
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
