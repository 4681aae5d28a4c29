"""``mergekit-expo demo OUT``: the whole job on tiny local checkpoints, offline.

Builds an SFT model and an "aligned" relative of it (real tokenizer, safetensors), writes an
``expo`` config for them, runs the real ``mergekit-yaml`` on it and reports how the result
differs from the aligned model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

DEMO_ALPHA = 0.3
PROMPTS = [
    "The assistant answers the question",
    "User: how do I merge two models? Assistant:",
]


def write_config(path: Path, reference: Path, aligned: Path, alpha: float) -> Path:
    config = {
        "merge_method": "expo",
        "base_model": str(reference.resolve()),
        "models": [{"model": str(aligned.resolve())}],
        "parameters": {"alpha": alpha},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build_inputs(out: Path, alpha: float = DEMO_ALPHA) -> tuple[Path, Path, Path]:
    """The demo's two checkpoints and its ``expo.yml`` in OUT: (reference, aligned, config)."""
    from mergekit_expo.demo.checkpoints import build_model, derive

    models = out / "models"
    # float32 keeps the reported step exact; bf16 rounding would blur it by a few percent.
    reference = build_model(models / "sft", seed=0, hidden=128, layers=2, dtype=torch.float32)
    aligned = derive(reference, models / "aligned", seed=1, scale=0.02)
    return reference, aligned, write_config(out / "expo.yml", reference, aligned, alpha)


def run_demo(out: Path, alpha: float = DEMO_ALPHA) -> dict[str, float]:
    out = out.resolve()
    reference, aligned, config = build_inputs(out, alpha)
    merged = out / "merged"
    command = [sys.executable, "-m", "mergekit.scripts.run_yaml", str(config), str(merged)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env)
    return compare(reference, aligned, merged)


def compare(reference: Path, aligned: Path, merged: Path) -> dict[str, float]:
    """Weight- and output-space differences between the merged and the aligned model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in (("sft", reference), ("aligned", aligned), ("merged", merged))
    }
    weights = {name: model.state_dict() for name, model in loaded.items()}
    step = sum((weights["aligned"][k] - weights["sft"][k]).pow(2).sum() for k in weights["sft"])
    moved = sum((weights["merged"][k] - weights["aligned"][k]).pow(2).sum() for k in weights["sft"])
    tokenizer = AutoTokenizer.from_pretrained(aligned)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = {n: m(**batch).logits[:, -1].log_softmax(-1) for n, m in loaded.items()}
    kl = torch.nn.functional.kl_div(
        logits["merged"], logits["aligned"], log_target=True, reduction="batchmean"
    )
    return {
        "alpha_measured": float((moved / step).sqrt()),
        "kl_aligned_to_merged": float(kl),
        "top1_agreement": float(
            (logits["merged"].argmax(-1) == logits["aligned"].argmax(-1)).float().mean()
        ),
    }
