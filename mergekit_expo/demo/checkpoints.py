"""Tiny but real Hugging Face checkpoints, built locally (no hub): for the demo, tests, benchmarks.

A byte-level BPE tokenizer trained with ``tokenizers`` on a few sentences, a small Llama from
transformers, weights in safetensors. ``derive`` makes an "aligned" relative of a checkpoint by
moving every weight by a small, seeded step, which is what SFT→DPO looks like in weight space.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

CORPUS = [
    "The assistant answers the question politely and helpfully.",
    "A helpful answer is honest, harmless and to the point.",
    "Alignment moves the weights a little from the SFT model.",
    "Extrapolate along that move to get a better aligned model.",
    "User: how do I merge two models? Assistant: write a YAML config.",
    "Preference pairs have a prompt, a chosen and a rejected response.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ! ? : ; ( ) ' \"",
] * 4

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def build_tokenizer(vocab_size: int = 320):
    """A real byte-level BPE tokenizer, wrapped so that AutoTokenizer loads it back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def build_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    tie_word_embeddings: bool = False,
    tokenizer=None,
) -> Path:
    """Save a randomly initialised small Llama (the "SFT" model) with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # spread the norms too, so every tensor has a non-trivial value
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    return _save(model.to(dtype), tokenizer, out_dir)


def build_reward_model(
    out_dir: str | Path,
    tokenizer,
    *,
    hidden: int = 32,
    layers: int = 1,
    num_labels: int = 1,
    seed: int = 3,
    heads: int | None = None,
) -> Path:
    """Save a tiny float32 Llama sequence classifier (a reward model) with ``tokenizer``;
    ``heads`` defaults to head_dim 16 (vLLM's CPU attention needs head_dim ≥ 32)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads or max(1, hidden // 16),
        num_key_value_heads=heads or max(1, hidden // 16),
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(LlamaForSequenceClassification(config), tokenizer, out_dir)


def derive(
    source_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    scale: float = 0.02,
    dtype: torch.dtype | None = None,
    add_tokens: Sequence[str] = (),
) -> Path:
    """Save a relative of ``source_dir``: every weight moved by ``scale`` × its RMS, seeded.

    ``add_tokens`` extends the vocabulary (as chat fine-tunes do) with fresh embedding rows.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    dtype = dtype or _saved_dtype(source_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            rms = parameter.pow(2).mean().sqrt()
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * rms * scale)
        if add_tokens:
            old = len(tokenizer)
            tokenizer.add_tokens(list(add_tokens))
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            for matrix in {
                model.get_input_embeddings().weight,
                model.get_output_embeddings().weight,
            }:
                rows = torch.randn((len(tokenizer) - old, matrix.shape[1]), generator=generator)
                matrix[old:] = rows * matrix[:old].pow(2).mean().sqrt()
    return _save(model.to(dtype), tokenizer, out_dir)


def _saved_dtype(model_dir: str | Path) -> torch.dtype:
    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as handle:
        return handle.get_tensor(next(iter(handle.keys()))).dtype


def _save(model, tokenizer, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
