"""The kernel through mergekit's in-memory API: merge_tensors and merge_state_dicts."""

from __future__ import annotations

import logging

import pytest
import torch
from mergekit.merge_methods import get, merge_state_dicts, merge_tensors
from reference import agreement, formula64

from mergekit_expo.merge.guards import NonFiniteError


def pair(dtype=torch.bfloat16, n=(512, 512), scale=0.02, seed=0):
    generator = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(n, generator=generator, dtype=torch.float64) * 0.02
    theta1 = theta0 + torch.randn(n, generator=generator, dtype=torch.float64) * 0.02 * scale
    return theta0.to(dtype), theta1.to(dtype)


def expo(tensors, base_index=0, **parameters):
    return merge_tensors(tensors, "expo", base_index=base_index, parameters=parameters)


def test_registered_by_name():
    method = get("expo")
    assert method.spec.name == "expo"
    assert {p.name for p in method.spec.parameters} == {
        "alpha",
        "lambda",
        "final",
        "warn_relative_change",
    }


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 2.0, 25.0])
def test_expo_bf16_agrees_with_float64_formula(alpha):
    theta0, theta1 = pair()
    out = expo([theta0, theta1], alpha=alpha)
    assert out.dtype == torch.bfloat16
    assert agreement(out, formula64(theta0, theta1, alpha=alpha)) >= 0.9999


def test_alpha_zero_is_aligned_and_minus_one_is_reference():
    theta0, theta1 = pair()
    assert torch.equal(expo([theta0, theta1], alpha=0.0), theta1)
    assert torch.equal(expo([theta0, theta1], alpha=-1.0), theta0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_other_float_dtypes_round_once(dtype):
    theta0, theta1 = pair(dtype)
    out = expo([theta0, theta1], alpha=0.3)
    expected = formula64(theta0, theta1, alpha=0.3)
    assert out.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-18)
    elif dtype == torch.float32:  # its own working precision: a few ulps of the operands
        bound = 2 * torch.finfo(dtype).eps * (theta1.double().abs() + expected.abs())
        assert bool(((out.double() - expected).abs() <= bound).all())
    else:
        assert agreement(out, expected) >= 0.9999


def test_base_position_does_not_matter():
    theta0, theta1 = pair()
    assert torch.equal(
        expo([theta1, theta0], base_index=1, alpha=0.4), expo([theta0, theta1], alpha=0.4)
    )


def test_iterative_merge_matches_algorithm_2():
    generator = torch.Generator().manual_seed(3)
    theta0 = torch.randn(300, 700, generator=generator, dtype=torch.float64) * 0.02
    checkpoints = [
        theta0 + torch.randn(300, 700, generator=generator, dtype=torch.float64) * 4e-4 * k
        for k in (1, 2, 3, 4)
    ]
    bf = [t.to(torch.bfloat16) for t in (theta0, *checkpoints)]
    for alpha, lam in ((0.4, 0.3), (1.7, 0.2), (0.3, 1.0)):
        out = merge_tensors(bf, "expo", base_index=0, parameters={"alpha": alpha, "lambda": lam})
        expected = formula64(bf[0], bf[-1], bf[1:-1], alpha=alpha, lam=lam)
        assert agreement(out, expected) >= 0.9999, (alpha, lam)


def test_lambda_zero_is_expo_on_final():
    theta0, a = pair(seed=1)
    _, final = pair(seed=2)
    with_intermediate = merge_tensors(
        [theta0, a, final], "expo", base_index=0, parameters={"alpha": 0.3, "lambda": 0.0}
    )
    assert torch.equal(with_intermediate, expo([theta0, final], alpha=0.3))


def test_explicit_final_marker_overrides_order():
    theta0, a = pair(seed=1)
    _, b = pair(seed=2)
    ids = ["sft", "dpo_final", "dpo_mid"]
    marked = merge_tensors(
        [theta0, b, a],
        "expo",
        ids=ids,
        base_index=0,
        parameters={"alpha": 0.4, "lambda": 0.3, "final": {"dpo_final": True, "dpo_mid": False}},
    )
    in_order = merge_tensors(
        [theta0, a, b], "expo", base_index=0, parameters={"alpha": 0.4, "lambda": 0.3}
    )
    assert torch.equal(marked, in_order)


def test_two_final_markers_are_refused():
    theta0, a = pair(seed=1)
    with pytest.raises(ValueError, match="more than one model has `final: true`"):
        merge_tensors([theta0, a, a.clone()], "expo", base_index=0, parameters={"final": True})


def test_merge_state_dicts_passes_non_float_buffers_and_uses_defaults():
    theta0, theta1 = pair()
    steps = torch.arange(5)
    out = merge_state_dicts(
        {"sft": {"w": theta0, "steps": steps}, "dpo": {"w": theta1, "steps": steps}},
        "expo",
        base="sft",
    )
    assert torch.equal(out["steps"], steps)
    assert agreement(out["w"], formula64(theta0, theta1, alpha=0.3)) >= 0.9999  # default α


def test_missing_reference_is_refused_with_instructions():
    theta0, theta1 = pair()
    with pytest.raises(ValueError, match="set `base_model:`"):
        merge_tensors([theta0, theta1], "expo", parameters={"alpha": 0.3})


def test_lambda_without_intermediate_is_refused():
    theta0, theta1 = pair()
    with pytest.raises(ValueError, match="no intermediate checkpoint"):
        expo([theta0, theta1], alpha=0.3, **{"lambda": 0.3})


def test_shape_mismatch_names_the_tensor():
    with pytest.raises(ValueError, match="size mismatch for lm_head.weight"):
        merge_tensors(
            [torch.zeros(4, 3), torch.zeros(5, 3)], "expo", base_index=0, name="lm_head.weight"
        )


def test_non_finite_input_names_model_and_tensor():
    theta0, theta1 = pair(torch.float32)
    theta1[3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match="input tensor q_proj of model dpo has 1 non-finite"):
        merge_tensors([theta0, theta1], "expo", ids=["sft", "dpo"], base_index=0, name="q_proj")


def test_float16_overflow_is_refused():
    theta0 = torch.full((4, 4), 60000.0, dtype=torch.float16)
    theta1 = torch.full((4, 4), 64000.0, dtype=torch.float16)
    with pytest.raises(NonFiniteError, match="overflows torch.float16"):
        merge_tensors([theta0, theta1], "expo", base_index=0, name="w", parameters={"alpha": 2.0})


@pytest.mark.parametrize("bad", ["abc", True, [0.1], None, float("inf")])
def test_parameters_must_be_numbers(bad):
    theta0, theta1 = pair()
    with pytest.raises(Exception, match="must be (a number|finite)"):
        expo([theta0, theta1], alpha=bad)


def test_numeric_strings_are_numbers():
    theta0, theta1 = pair()
    assert torch.equal(expo([theta0, theta1], alpha="1e-1"), expo([theta0, theta1], alpha=0.1))


def test_unrelated_models_warn_once_with_the_figure(caplog):
    theta0, _ = pair(seed=5)
    unrelated, _ = pair(seed=6)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        for name in ("a", "b"):
            merge_tensors(
                [theta0, unrelated], "expo", ids=["ref-x", "stranger-x"], base_index=0, name=name
            )
    warnings = [r.getMessage() for r in caplog.records if "probably not an SFT" in r.getMessage()]
    assert len(warnings) == 1
    assert "stranger-x" in warnings[0] and "1.4" in warnings[0]


def test_related_models_do_not_warn(caplog):
    theta0, theta1 = pair(seed=7)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        merge_tensors([theta0, theta1], "expo", ids=["ref-y", "dpo-y"], base_index=0, name="w")
    assert not [r for r in caplog.records if "probably not" in r.getMessage()]


def test_kernel_is_device_agnostic_meta_tensors():
    """No hidden CPU tensors: the kernel runs on the inputs' device (meta stands in for CUDA)."""
    from mergekit_expo.merge.formula import extrapolate

    theta0 = torch.empty(64, 64, device="meta", dtype=torch.bfloat16)
    out = extrapolate(theta0, theta0, alpha=0.3)
    assert out.device.type == "meta"
    out = extrapolate(theta0, theta0, [theta0], alpha=0.3, lam=0.2)
    assert out.device.type == "meta" and out.dtype == torch.bfloat16
