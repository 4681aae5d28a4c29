"""Synthetic Llama-shaped bf16 checkpoints, written shard by shard (no model is instantiated).

The SFT model θ₀ has Llama-like weight scales (linear layers and embeddings N(0, 0.02²), norms
around 1). Each derived checkpoint is its predecessor plus seeded Gaussian noise of ``step`` ×
the tensor's RMS (2 % by default): θ₁ = θ₀ + ε₁, θ₂ = θ₁ + ε₂, …; θ_T is the "DPO" model.
Files look like a real release: ``config.json`` for ``LlamaForCausalLM``, ``model-0000k-of-0000n
.safetensors`` shards in Hugging Face tensor order, ``model.safetensors.index.json`` and a small
tokenizer. A finished checkpoint is marked by ``.complete``, so an interrupted build is redone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

COMPLETE = ".complete"
DEFAULT_STEP = 0.02


@dataclass(frozen=True)
class Shape:
    """The dimensions of a Llama model (TinyLlama-1.1B's widths by default)."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in the order transformers saves a LlamaForCausalLM."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def parameters(self) -> int:
        total = 0
        for _, shape in self.tensors():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
            "initializer_range": 0.02,
        }


TINY = Shape(hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, vocab=1024)
# Llama-2-7B's widths (6.74 B parameters at 32 layers, 13.5 GB in bf16)
LLAMA_7B = Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)


def shape_for(parameters: float) -> Shape:
    """A Llama shape with about ``parameters`` weights: TinyLlama's widths, as many layers as fit.

    Below 100 M parameters the widths of a tiny test model are used instead, from 5 B on
    Llama-2-7B's (``7B`` gives its exact shape).
    """
    base = LLAMA_7B if parameters >= 5e9 else Shape() if parameters >= 100e6 else TINY
    if base is LLAMA_7B and 6.5e9 <= parameters < 7.5e9:  # "7B" is a name, not a count
        return LLAMA_7B
    fixed = Shape(**{**asdict(base), "layers": 0}).parameters()
    per_layer = Shape(**{**asdict(base), "layers": 1}).parameters() - fixed
    layers = max(1, round((parameters - fixed) / per_layer))
    return Shape(**{**asdict(base), "layers": layers})


def parse_count(text: str | float) -> float:
    """``"1.1B"``, ``"300M"``, ``"1GB"``, ``"5e6"`` -> a number (B = billion, as in mergekit)."""
    if isinstance(text, (int, float)):
        return float(text)
    text = text.strip().upper()
    if len(text) > 2 and text[-1] == "B" and text[-2] in "KMG":
        text = text[:-1]
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(text[-1:], 1.0)
    return float(text[:-1] if text[-1:] in "KMBG" else text) * scale


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sft_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_seed("sft", seed, name))
    if name.endswith("norm.weight"):
        return torch.rand(shape, generator=generator).add_(0.5).to(torch.bfloat16)
    return torch.randn(shape, generator=generator).mul_(0.02).to(torch.bfloat16)


def _noise_step(tensor: torch.Tensor, name: str, seed: int, step: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_seed("step", seed, name))
    work = tensor.to(torch.float32)
    rms = float(work.pow(2).mean().sqrt())
    noise = torch.randn(tensor.shape, generator=generator)
    return work.add_(noise, alpha=rms * step).to(torch.bfloat16)


def _shard_plan(shape: Shape, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        count = 2
        for dim in dims:
            count *= dim
        if shards[-1] and size + count > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += count
    return shards


def _write_checkpoint(
    out: Path,
    shape: Shape,
    shard_bytes: int,
    tensor_fn,
    desc: str,
    meta: dict,
) -> Path:
    if (out / COMPLETE).exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    plan = _shard_plan(shape, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    with tqdm(total=shape.parameters(), desc=desc, unit="param", unit_scale=True) as bar:
        for index, entries in enumerate(plan, start=1):
            file_name = f"model-{index:05d}-of-{len(plan):05d}.safetensors"
            tensors = {}
            for name, dims in entries:
                tensors[name] = tensor_fn(name, dims)
                weight_map[name] = file_name
                total += tensors[name].numel() * 2
                bar.update(tensors[name].numel())
            save_file(tensors, str(out / file_name), metadata={"format": "pt"})
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(shape.config(), indent=2))
    _write_tokenizer(out)
    (out / COMPLETE).write_text(json.dumps(meta))
    return out


def _write_tokenizer(out: Path) -> None:
    _tokenizer().save_pretrained(str(out))


@functools.cache
def _tokenizer():
    """Trained once per process: every checkpoint of a family has the same tokenizer."""
    from mergekit_expo.demo.checkpoints import build_tokenizer

    return build_tokenizer()


class CheckpointReader:
    """Tensors of a sharded safetensors checkpoint by name, one open shard at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(self.path / "model.safetensors"), framework="pt") as handle:
                self.weight_map = {name: "model.safetensors" for name in handle.keys()}
        self._file: str | None = None
        self._handle = None

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        file_name = self.weight_map[name]
        if file_name != self._file:
            self._handle = safe_open(str(self.path / file_name), framework="pt")
            self._file = file_name
        return self._handle.get_tensor(name)

    def files(self) -> list[Path]:
        return [self.path / f for f in sorted(set(self.weight_map.values()))]


def build_family(
    root: Path,
    shape: Shape,
    *,
    count: int,
    shard_bytes: int,
    seed: int = 0,
    step: float = DEFAULT_STEP,
) -> list[Path]:
    """θ₀ (``sft``) and ``count`` successive relatives ``it1`` … under ``root``; returns paths."""
    tag = f"{shape.parameters() / 1e9:.3g}B-L{shape.layers}-H{shape.hidden}-s{seed}"
    family = Path(root) / tag
    meta = {"shape": asdict(shape), "seed": seed, "step": step, "shard_bytes": shard_bytes}
    paths = [
        _write_checkpoint(
            family / "sft",
            shape,
            shard_bytes,
            lambda name, dims: _sft_tensor(name, dims, seed),
            f"build {tag}/sft",
            meta,
        )
    ]
    for k in range(1, count + 1):
        previous = CheckpointReader(paths[-1])
        paths.append(
            _write_checkpoint(
                family / f"it{k}",
                shape,
                shard_bytes,
                lambda name, dims, prev=previous, k=k: _noise_step(
                    prev.get(name), name, seed * 1000 + k, step
                ),
                f"build {tag}/it{k}",
                {**meta, "derived_from": paths[-1].name},
            )
        )
    return paths
