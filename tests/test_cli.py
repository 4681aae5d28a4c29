"""The installed console scripts, run as a user runs them, and the output loaded back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from reference import agreement, formula64, load

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def test_mergekit_yaml_console_script_and_transformers_forward(console_merge):
    """``mergekit-yaml expo.yml OUT -v`` (the session's one run of it, ``console_merge``)."""
    sft, dpo, out = console_merge["sft"], console_merge["dpo"], console_merge["out"]
    assert console_merge["returncode"] == 0, console_merge["stderr"][-3000:]
    assert f"expo roles: reference θ₀ = {sft}; final θ_T = {dpo}" in console_merge["stderr"]

    merged, theta0, theta1 = load(out), load(sft), load(dpo)
    alpha = console_merge["alpha"]
    for name, tensor in merged.items():
        assert agreement(tensor, formula64(theta0[name], theta1[name], alpha=alpha)) >= 0.9999

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    aligned = AutoModelForCausalLM.from_pretrained(str(dpo)).eval()
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    batch = tokenizer(["The assistant answers the question"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        aligned_logits = aligned(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    assert bool(torch.isfinite(logits).all())
    assert not torch.equal(logits, aligned_logits)  # the extrapolation changed the model
    for name, parameter in model.state_dict().items():
        if name in merged:
            assert torch.equal(parameter, merged[name]), name


def test_demo_command(tmp_path):
    result = run(BIN / "mergekit-expo", "demo", tmp_path / "demo")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = tmp_path / "demo" / "merged"
    assert f"Extrapolated model: {merged}" in result.stdout
    measured = float(result.stdout.split("= ")[1].split()[0])
    assert abs(measured - 0.3) < 1e-3  # ‖θ₂ − θ₁‖ / ‖θ₁ − θ₀‖ = α
    assert (merged / "config.json").exists() and (merged / "model.safetensors").exists()
