"""The paper's approach: both models in RAM with transformers, bf16 arithmetic, save_pretrained.

Mirrors the released ExPO script (chujiezheng/LLM-Extrapolation, ``code/extrapolate.py``): load
SFT and DPO with ``AutoModelForCausalLM.from_pretrained(dtype=bfloat16, device_map="auto")``,
replace every DPO parameter by ``θ₁ + α(θ₁ − θ₀)`` computed in bf16, ``save_pretrained`` the DPO
model and copy the tokenizer. Usage: ``python inram.py SFT DPO OUT --alpha 0.3``.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sft")
    parser.add_argument("dpo")
    parser.add_argument("out")
    parser.add_argument("--alpha", type=float, required=True)
    args = parser.parse_args()

    start = time.perf_counter()
    load = dict(dtype=torch.bfloat16, device_map="auto")
    sft = AutoModelForCausalLM.from_pretrained(args.sft, **load)
    dpo = AutoModelForCausalLM.from_pretrained(args.dpo, **load)
    loaded = time.perf_counter()
    sft_state = sft.state_dict()
    with torch.no_grad():
        for name, parameter in dpo.named_parameters():
            parameter.data = parameter.data + args.alpha * (parameter.data - sft_state[name].data)
    merged = time.perf_counter()
    dpo.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.dpo).save_pretrained(args.out)
    saved = time.perf_counter()
    print(
        f"phases: load {loaded - start:.2f} s, merge {merged - loaded:.2f} s, "
        f"save {saved - merged:.2f} s"
    )


if __name__ == "__main__":
    main()
