"""The README.md model card of an extrapolated adapter: what was done, with which α and λ."""

from __future__ import annotations

from typing import Any


def adapter_card(record: dict[str, Any]) -> str:
    alpha, lam = record["alpha"], record["lambda"]
    inputs = record["inputs"]
    reference = [i for i in inputs if i["role"] == "reference"]
    base = record["base"] or "the base model named in adapter_config.json"
    theta0 = f"`{base}` + adapter `{reference[0]['adapter']}`" if reference else f"`{base}`"
    if record["route"] == "dora":
        how = (
            f"DoRA: each row of `lora_B` of `{inputs[-1]['adapter']}` is multiplied by its own "
            "factor and the magnitude vector recomputed from θ₀'s rows (float64, rounded once), "
            "so that the merged model is exactly (1+α)θ₁ − αθ₀; the scaling is unchanged."
        )
        formula = "θ₂ = θ₁ + α(θ₁ − θ₀)"
    elif record["route"] == "scaling":
        how = (
            f"The update of `{inputs[-1]['adapter']}` is multiplied by 1 + α = {1 + alpha:g} "
            f"through its scaling: `lora_alpha` (and every `alpha_pattern` entry) × {1 + alpha:g}, "
            f"now `lora_alpha` = {record['lora_alpha']:g}. The A and B weights are unchanged."
        )
        formula = "θ₂ = θ₁ + α(θ₁ − θ₀) = θ₀ + (1+α)·s·BA"
    else:
        how = (
            "The adapters' low-rank factors are concatenated along the rank; each block of B "
            "carries its coefficient × its scaling (float64, rounded once); the scaling is 1."
        )
        formula = "θ = −αθ₀ + (1+α)λθ̄ + (1+α)(1−λ)θ_T, θ̄ = mean(θ₁…θ_{T−1})"
    if record.get("full_tensors"):
        how += (
            f" Full tensors ({', '.join(record['full_tensors'])}) are extrapolated against "
            "θ₀'s in float64 and rounded once to their dtype."
        )
    rows = "\n".join(
        f"| `{i['adapter']}` | {i['role']} | {i['coefficient']:.6g} |" for i in inputs
    )
    return f"""---
library_name: peft
base_model: {base}
tags:
- mergekit-expo
- expo
- lora
---
# Extrapolated LoRA adapter (ExPO)

Made by `mergekit-expo lora` with α = {alpha:g}{f", λ = {lam:g}" if lam else ""}:
{formula}, applied over θ₀ = {theta0}.

{how}

| adapter | role | coefficient of its update |
|---|---|---|
{rows}

Load it with PEFT over θ₀'s base model (`PeftModel.from_pretrained(base, this_dir)`); merging it
(`merge_and_unload`) gives the extrapolated model. `mergekit_expo.json` records the same facts.
"""
