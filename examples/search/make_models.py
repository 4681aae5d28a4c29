"""Two tiny trained checkpoints for the search example: an "SFT" model and an "aligned" one.

    python examples/search/make_models.py OUT_DIR

θ₀ (OUT_DIR/sft): a 2-layer Llama (hidden 64, bf16; 2 heads of 32, the smallest head vLLM's
CPU attention takes, so the example also runs with ``--engine vllm``) trained from scratch on
the sentences of ``mergekit_expo.demo.checkpoints.CORPUS``. θ₁ (OUT_DIR/aligned): θ₀ fine-tuned
a little further on the "helpful" sentences only, a stand-in for preference training.
Extrapolating θ₁ away from θ₀ makes the model say more "helpful" words; too far and its answers
fall apart, so the example scorer (``scorers.py:helpful_and_fluent``) has an optimum inside the
α grid. Everything is local and seeded; it takes about 20 s on a CPU core.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from mergekit_expo.demo.checkpoints import CORPUS, build_model, build_tokenizer  # noqa: E402

SENTENCES = sorted(set(CORPUS))
HELPFUL = [s for s in SENTENCES if "help" in s.lower() or "Assistant" in s]


def train(model, tokenizer, sentences: list[str], steps: int, lr: float, seed: int) -> None:
    """Plain next-token training on whole sentences (each ended by </s>), batch of 8."""
    generator = torch.Generator().manual_seed(seed)
    encoded = [tokenizer(s)["input_ids"] + [tokenizer.eos_token_id] for s in sentences]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(encoded), (8,), generator=generator).tolist()
        batch = [encoded[i] for i in picks]
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        for row, sequence in enumerate(batch):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, : len(sequence)] = torch.tensor(sequence)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def main(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = out.resolve()
    # one thread: a model this small trains fastest on one, and so it comes out the same whatever
    # the core count (several threads may add up a matrix product in another order)
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    build_model(out / "init", seed=0, hidden=64, heads=2, layers=2, dtype=torch.float32,
                tokenizer=tokenizer)
    model = AutoModelForCausalLM.from_pretrained(out / "init", dtype=torch.float32)
    torch.manual_seed(0)
    train(model, tokenizer, SENTENCES, steps=300, lr=3e-3, seed=0)
    model.to(torch.bfloat16).save_pretrained(out / "sft")
    tokenizer.save_pretrained(out / "sft")
    model.to(torch.float32)
    train(model, tokenizer, HELPFUL, steps=20, lr=3e-4, seed=1)
    model.to(torch.bfloat16).save_pretrained(out / "aligned")
    tokenizer.save_pretrained(out / "aligned")
    config = {
        "merge_method": "expo",
        "base_model": str(out / "sft"),
        "models": [{"model": str(out / "aligned")}],
        "parameters": {"alpha": 0.3},
    }
    (out / "expo.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"θ₀: {out / 'sft'}\nθ₁: {out / 'aligned'}\nconfig: {out / 'expo.yml'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
