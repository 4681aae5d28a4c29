"""The real mergekit engine (run_merge, in process) on tiny real checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import run_merge_in_process
from reference import agreement, formula64, load

from mergekit_expo.merge.guards import NonFiniteError
from mergekit_expo.merge.roles import reset_announcements


def expo_config(base, *models, **parameters) -> dict:
    return {
        "merge_method": "expo",
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        "parameters": parameters,
    }


def assert_formula(out_dir, base, final, intermediates=(), *, alpha, lam=0.0, minimum=0.9999):
    out, theta0, theta_t = load(out_dir), load(base), load(final)
    mids = [load(m) for m in intermediates]
    assert set(out) == set(theta_t)
    for name, tensor in out.items():
        expected = formula64(
            theta0[name], theta_t[name], [m[name] for m in mids], alpha=alpha, lam=lam
        )
        assert tensor.dtype == theta_t[name].dtype, name
        assert agreement(tensor, expected) >= minimum, name


def test_expo_bf16_matches_float64_formula_on_every_tensor(zoo, tmp_path):
    out = run_merge_in_process(expo_config(zoo.sft, zoo.dpo, alpha=0.3), tmp_path / "out")
    assert_formula(out, zoo.sft, zoo.dpo, alpha=0.3)
    elements = sum(t.numel() for t in load(out).values())
    assert elements > 1_000_000  # enough elements for a 0.01 % statement to mean something


def test_agreement_figure_over_the_whole_model(zoo, tmp_path):
    """The headline number: share of all elements equal to the float64 formula in bf16."""
    for alpha in (0.3, 1.7):
        out = load(
            run_merge_in_process(expo_config(zoo.sft, zoo.dpo, alpha=alpha), tmp_path / f"a{alpha}")
        )
        theta0, theta1 = load(zoo.sft), load(zoo.dpo)
        same = sum(
            int((out[k] == formula64(theta0[k], theta1[k], alpha=alpha).to(out[k].dtype)).sum())
            for k in out
        )
        total = sum(t.numel() for t in out.values())
        assert same / total >= 0.9999, (alpha, same / total)


def average_of(models, out, out_dtype):
    return run_merge_in_process(
        {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
            "dtype": "float32",
            "out_dtype": out_dtype,
        },
        out,
    )


def test_iterative_merge_individual_and_preaveraged_agree(zoo, tmp_path):
    it1, it2, it3 = zoo.iterates(3)
    config = expo_config(zoo.sft, it1, it2, it3, alpha=0.4, **{"lambda": 0.3})
    single = run_merge_in_process(config, tmp_path / "single")
    assert_formula(single, zoo.sft, it3, (it1, it2), alpha=0.4, lam=0.3)

    # θ̄ kept in float32 by the `linear` step: the same weights up to the output rounding
    average = average_of((it1, it2), tmp_path / "average32", "float32")
    config = expo_config(zoo.sft, average, it3, alpha=0.4, **{"lambda": 0.3})
    config["out_dtype"] = "bfloat16"
    two_step = load(run_merge_in_process(config, tmp_path / "two_step32"))
    a = load(single)
    for name in a:
        assert two_step[name].dtype == torch.bfloat16
        assert agreement(two_step[name], a[name].double()) >= 0.9999, name


def test_iterative_merge_with_bf16_average_differs_only_by_its_rounding(zoo, tmp_path):
    it1, it2, it3 = zoo.iterates(3)
    single = load(
        run_merge_in_process(
            expo_config(zoo.sft, it1, it2, it3, alpha=0.4, **{"lambda": 0.3}), tmp_path / "single"
        )
    )
    average = average_of((it1, it2), tmp_path / "average16", "bfloat16")
    two_step = load(
        run_merge_in_process(
            expo_config(zoo.sft, average, it3, alpha=0.4, **{"lambda": 0.3}), tmp_path / "two_step"
        )
    )
    mid1, mid2 = load(it1), load(it2)
    eps = torch.finfo(torch.bfloat16).eps
    for name in single:
        # θ̄ rounded to bf16 (half an ulp of θ̄) reaches the output scaled by (1+α)λ, plus one
        # output rounding: nothing else may differ.
        mean = (mid1[name].double() + mid2[name].double()) / 2
        bound = eps * (single[name].double().abs() + (1 + 0.4) * 0.3 * mean.abs())
        diff = (single[name].double() - two_step[name].double()).abs()
        assert bool((diff <= bound).all()), name


def test_slices_with_layer_ranges_and_slice_parameters(zoo, tmp_path):
    config = {
        "merge_method": "expo",
        "base_model": str(zoo.sft),
        "slices": [
            {
                "sources": [
                    {"model": str(zoo.sft), "layer_range": [0, 1]},
                    {"model": str(zoo.dpo), "layer_range": [0, 1]},
                ],
                "parameters": {"alpha": 0.2},
            },
            {
                "sources": [
                    {"model": str(zoo.sft), "layer_range": [1, 2]},
                    {"model": str(zoo.dpo), "layer_range": [1, 2]},
                ],
                "parameters": {"alpha": 0.6},
            },
        ],
    }
    out = load(run_merge_in_process(config, tmp_path / "out"))
    theta0, theta1 = load(zoo.sft), load(zoo.dpo)
    for name, tensor in out.items():
        alpha = (
            0.6 if ".layers.1." in name or name in ("model.norm.weight", "lm_head.weight") else 0.2
        )
        assert agreement(tensor, formula64(theta0[name], theta1[name], alpha=alpha)) >= 0.9999, name


def test_per_module_filters_and_layer_gradients(zoo, tmp_path):
    config = expo_config(zoo.sft, zoo.dpo)
    config["parameters"] = {
        "alpha": [
            {"filter": "mlp", "value": 0.5},
            {"filter": "self_attn", "value": [0.1, 0.3]},
            {"value": 0.2},
        ]
    }
    out = load(run_merge_in_process(config, tmp_path / "out"))
    theta0, theta1 = load(zoo.sft), load(zoo.dpo)
    for name, tensor in out.items():
        if "mlp" in name:
            alpha = 0.5
        elif "self_attn" in name:  # gradient over 2 layers: t = 0 → 0.1, t = 1 → 0.3
            alpha = 0.1 if ".layers.0." in name else 0.3
        else:
            alpha = 0.2
        assert agreement(tensor, formula64(theta0[name], theta1[name], alpha=alpha)) >= 0.9999, name


def _rows_by_token(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).get_vocab()


@pytest.mark.parametrize("source", ["union", "base"])
def test_tokenizer_union_and_base_with_added_tokens(zoo, tmp_path, source):
    added = ["<|im_start|>", "<|im_end|>"]
    aligned = zoo.relative("dpo_tokens", zoo.sft, seed=1, add_tokens=added)
    config = expo_config(zoo.sft, aligned, alpha=0.5)
    config["tokenizer"] = {"source": source}
    out_dir = run_merge_in_process(config, tmp_path / source)
    out, theta0, theta1 = load(out_dir), load(zoo.sft), load(aligned)
    vocab_out, vocab0, vocab1 = (
        _rows_by_token(out_dir),
        _rows_by_token(zoo.sft),
        _rows_by_token(aligned),
    )
    assert out["model.embed_tokens.weight"].shape[0] == len(vocab_out)
    assert (set(added) <= set(vocab_out)) == (source == "union")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for token, row in vocab_out.items():
            if token in vocab0:
                expected = formula64(
                    theta0[name][vocab0[token]], theta1[name][vocab1[token]], alpha=0.5
                )
                assert agreement(out[name][row], expected) >= 0.98, (name, token)
            else:  # the reference lacks it: the aligned model's own row, untouched
                assert torch.equal(out[name][row], theta1[name][vocab1[token]]), (name, token)


def test_union_tokens_reference_lacks_keep_final_row_in_iterative_merge(zoo, tmp_path):
    added = ["<|tool|>"]
    it1 = zoo.relative("iter_tok1", zoo.sft, seed=21, add_tokens=added)
    it2 = zoo.relative("iter_tok2", it1, seed=22, scale=0.01)
    config = expo_config(zoo.sft, it1, it2, alpha=0.4, **{"lambda": 0.3})
    config["tokenizer"] = {"source": "union"}
    out_dir = run_merge_in_process(config, tmp_path / "out")
    out, final = load(out_dir), load(it2)
    row_out, row_final = _rows_by_token(out_dir)["<|tool|>"], _rows_by_token(it2)["<|tool|>"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out[name][row_out], final[name][row_final])


def test_lora_input(zoo, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    sft = zoo.base("sft32", dtype=torch.float32, seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(sft), dtype=torch.float32)
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    adapter = tmp_path / "adapter"
    lora.save_pretrained(str(adapter))
    config = expo_config(f"{sft}", f"{sft}+{adapter}", alpha=0.5)
    out = load(
        run_merge_in_process(config, tmp_path / "out", lora_merge_cache=str(tmp_path / "cache"))
    )

    from safetensors.torch import load_file

    lora_weights = load_file(str(adapter / "adapter_model.safetensors"))
    theta0 = load(sft)
    scale = 8 / 4
    checked = 0
    for name, tensor in out.items():
        theta1 = theta0[name].double()
        stem = name.removesuffix(".weight")
        a_key = next((k for k in lora_weights if stem in k and "lora_A" in k), None)
        if a_key:
            a = lora_weights[a_key].double()
            b = lora_weights[a_key.replace("lora_A", "lora_B")].double()
            theta1 = theta1 + scale * (b @ a)
            checked += 1
        expected = formula64(theta0[name], theta1, alpha=0.5)
        torch.testing.assert_close(tensor.double(), expected, rtol=2e-6, atol=2e-7)
    assert checked == 4  # q_proj and v_proj of both layers were extrapolated along the adapter


def test_float16_overflow_stops_the_merge_and_leaves_nothing_complete(zoo, tmp_path):
    sft = zoo.base("sft16", dtype=torch.float16, seed=4)
    dpo = zoo.relative("dpo16", sft, seed=5)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match="overflows torch.float16"):
        run_merge_in_process(expo_config(sft, dpo, alpha=1e6), out)
    assert not (out / "config.json").exists()
    assert not (out / "model.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists()


def test_out_dtype_overflow_is_caught_after_the_cast(zoo, tmp_path):
    sft = zoo.base("sft32", dtype=torch.float32, seed=3)
    dpo = zoo.relative("dpo32", sft, seed=6, scale=0.5)
    config = expo_config(sft, dpo, alpha=1e6)
    config["out_dtype"] = "float16"
    with pytest.raises(NonFiniteError, match="overflows torch.float16"):
        run_merge_in_process(config, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_non_numeric_parameter_is_refused_before_writing(zoo, tmp_path):
    with pytest.raises(Exception, match="'alpha' must be a number"):
        run_merge_in_process(expo_config(zoo.sft, zoo.dpo, alpha="strong"), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_base_model_is_refused_before_writing(zoo, tmp_path):
    config = expo_config(zoo.sft, zoo.dpo, alpha=0.3)
    del config["base_model"]
    with pytest.raises(ValueError, match="set `base_model:`"):
        run_merge_in_process(config, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_lambda_without_intermediates_is_refused(zoo, tmp_path):
    with pytest.raises(ValueError, match="no intermediate checkpoint"):
        run_merge_in_process(
            expo_config(zoo.sft, zoo.dpo, alpha=0.3, **{"lambda": 0.2}), tmp_path / "o"
        )
    assert not (tmp_path / "o" / "config.json").exists()


def test_unrelated_checkpoint_warns_once_with_figure(zoo, tmp_path, caplog):
    stranger = zoo.base("stranger", hidden=256, seed=77)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        run_merge_in_process(expo_config(zoo.sft, stranger, alpha=0.3), tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if "probably not an SFT" in r.getMessage()]
    assert len(warnings) == 1 and str(stranger) in warnings[0]


def test_roles_in_log_and_model_card(zoo, tmp_path, caplog):
    it1, it2, it3 = zoo.iterates(3)
    config = expo_config(zoo.sft, it1, it2, it3, alpha=0.4, **{"lambda": 0.3})
    reset_announcements()  # roles are logged once per process; earlier tests used these
    with caplog.at_level(logging.INFO, logger="mergekit_expo"):
        out = run_merge_in_process(config, tmp_path / "out")
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert f"reference θ₀ = {zoo.sft}; final θ_T = {it3}" in log
    assert str(it1) in log and "alpha = 0.4, lambda = 0.3" in log
    card = (out / "README.md").read_text()
    section = card.split("### Extrapolation roles (mergekit-expo)")[1]
    assert f"reference θ₀ (base_model): {zoo.sft}" in section
    assert f"final θ_T: {it3}" in section
    assert str(it1) in section and str(it2) in section
    assert "alpha: 0.4" in section and "lambda: 0.3" in section


def test_final_marker_in_yaml(zoo, tmp_path):
    it1, it2, it3 = zoo.iterates(3)
    config = expo_config(zoo.sft, it3, it1, it2, alpha=0.4, **{"lambda": 0.3})
    config["models"][0]["parameters"] = {"final": True}
    out = run_merge_in_process(config, tmp_path / "out")
    assert_formula(out, zoo.sft, it3, (it1, it2), alpha=0.4, lam=0.3)
    assert f"final θ_T: {it3}" in (out / "README.md").read_text()
