"""Exact on every path (issue 9, item 4): device copies and mixed dtypes change nothing."""

from __future__ import annotations

import pytest
import test_merge_graph
import torch
from conftest import run_merge_in_process
from reference import load
from test_merge_graph import expo_config


@pytest.fixture
def executor_copies_tensors(monkeypatch):
    """Fault injector: mergekit's device move returns a copy, as it does with --cuda/--device.

    On CPU the executor hands tasks the very tensor objects; on an accelerator it hands copies.
    This makes the CPU behave like the accelerator case; the merge itself is unchanged.
    """
    from mergekit.graph import Executor

    original = Executor._move_tensors

    def copy_everything(value):
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, dict):
            return {k: copy_everything(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy_everything(v) for v in value)
        return value

    def move(self, value, device, non_blocking=None):
        return copy_everything(original(self, value, device, non_blocking))

    monkeypatch.setattr(Executor, "_move_tensors", move)


def test_union_rows_reference_lacks_survive_device_copies(zoo, tmp_path, executor_copies_tensors):
    """θ₀ lacks the token; mergekit invents its row as the mean of the models that have it
    (θ₁, θ₂), so without the guard the row would be extrapolated against that mean. The same
    check as in test_merge_graph, with the executor copying tensors as it does on a GPU."""
    test_merge_graph.test_union_tokens_reference_lacks_keep_final_row_in_iterative_merge(
        zoo, tmp_path
    )


# -- the search scores exactly what the merge writes, over input dtypes × dtype × out_dtype ----

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INPUT_MIXES = ["bf16+fp32", "fp32+bf16", "fp16+bf16", "bf16+bf16"]  # θ₀ + θ_T


@pytest.fixture(scope="module")
def mixed_checkpoints(zoo):
    """θ₀ and θ_T of one pair, saved in each dtype (one float32 source, cast on saving)."""
    sft = zoo.base("mix_sft32", hidden=64, seed=8, dtype=torch.float32)
    reference = {k: zoo.relative(f"mix_sft_{k}", sft, seed=0, scale=0.0, dtype=d)
                 for k, d in DTYPES.items()}
    final = {k: zoo.relative(f"mix_dpo_{k}", sft, seed=60, scale=0.03, dtype=d)
             for k, d in DTYPES.items()}
    return reference, final


@pytest.mark.parametrize("out_dtype", [None, "bfloat16", "float16"])
@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
@pytest.mark.parametrize("mix", INPUT_MIXES)
def test_search_candidate_is_the_merge_bit_for_bit_over_dtypes(
    mix, dtype, out_dtype, mixed_checkpoints, tmp_path
):
    from conftest import write_config

    from mergekit_expo.search.candidates import CandidateWeights
    from mergekit_expo.search.merge_config import load_search_config

    reference, final = mixed_checkpoints
    first, second = mix.split("+")
    config = expo_config(reference[first], final[second], alpha=0.7)
    config.update({k: v for k, v in (("dtype", dtype), ("out_dtype", out_dtype)) if v})
    weights = CandidateWeights(load_search_config(write_config(tmp_path / "c.yml", config)),
                               progress=False)
    weights.apply(0.7, 0.0)
    ours = weights.state_dict()
    merged = load(run_merge_in_process(config, tmp_path / "out"))
    assert set(ours) == set(merged)
    for name, tensor in merged.items():
        assert ours[name].dtype == tensor.dtype, (name, ours[name].dtype, tensor.dtype)
        assert torch.equal(ours[name], tensor), name


# -- a real merge rounds once into out_dtype, against the exact-fraction reference -------------


def _exact_off(merged: dict, theta0: dict, final: dict, mids=(), *, alpha: str, lam: str = "0"):
    """Elements of a merged checkpoint that are not the exact formula rounded once."""
    from reference import bits_of, exact_formula, round_bits

    off = 0
    for name, tensor in merged.items():
        if not tensor.is_floating_point():
            continue
        columns = [theta0[name], final[name], *(m[name] for m in mids)]
        rows = zip(*(c.flatten().tolist() for c in columns), strict=True)
        expected = [round_bits(exact_formula(t0, ft, rest, alpha=alpha, lam=lam), tensor.dtype)
                    for t0, ft, *rest in rows]
        off += sum(g != e for g, e in zip(bits_of(tensor.flatten()), expected, strict=True))
    return off


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_out_dtype_is_rounded_into_once(dtype, mixed_checkpoints, tmp_path):
    """float32 θ₁, bf16 θ₀, ``out_dtype: bfloat16``: the kernel works in float32 and mergekit
    casts its result to bf16; the kernel rounds straight into bf16, so that cast is a copy."""
    reference, final = mixed_checkpoints
    config = expo_config(reference["bf16"], final["fp32"], alpha=0.7)
    config.update({"out_dtype": "bfloat16", **({"dtype": dtype} if dtype else {})})
    merged = load(run_merge_in_process(config, tmp_path / "out"))
    assert {t.dtype for t in merged.values() if t.is_floating_point()} == {torch.bfloat16}
    assert _exact_off(merged, load(reference["bf16"]), load(final["fp32"]), alpha="0.7") == 0


def test_float32_iterative_merge_is_exact(zoo, mixed_checkpoints, tmp_path):
    """float32 inputs, λ = 1 and three intermediates: θ̄ is not a float64 number in general."""
    reference, final = mixed_checkpoints
    sft = zoo.base("mix_sft32", hidden=64, seed=8, dtype=torch.float32)
    mids = [zoo.relative(f"mix_mid_{i}", sft, seed=70 + i, scale=0.03, dtype=torch.float32)
            for i in range(3)]
    config = expo_config(reference["fp32"], *mids, final["fp32"], alpha=0.5,
                         **{"lambda": 1.0})
    merged = load(run_merge_in_process(config, tmp_path / "out"))
    off = _exact_off(merged, load(reference["fp32"]), load(final["fp32"]),
                     [load(m) for m in mids], alpha="0.5", lam="1")
    assert off == 0
