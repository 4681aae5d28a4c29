"""Training for the toy task: a tiny Llama from scratch, SFT, DPO and iterative DPO with TRL.

Every stage is seeded and saves ordinary Hugging Face checkpoints (safetensors, float32) that
mergekit reads as it reads any model.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import toy_task  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

LOG = logging.getLogger("toy_alignment")


@dataclass
class Settings:
    """Every knob of a run; the defaults are the documented full run (``--smoke`` shrinks it)."""

    seed: int = 0
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    # SFT
    sft_examples: int = 4000
    sft_epochs: int = 2
    sft_batch: int = 32
    sft_lr: float = 3e-3
    # DPO on off-policy pairs (two SFT-distribution answers per prompt, labelled by R)
    dpo_pairs: int = 2400
    dpo_steps: int = 150
    dpo_batch: int = 32
    dpo_lr: float = 2e-4
    beta: float = 0.1
    checkpoint_fractions: tuple[float, ...] = (0.1, 0.2, 0.4, 1.0)
    # iterative DPO: sample from the current policy, best vs worst of `samples_per_prompt`
    iterations: int = 3
    iter_prompts: int = 768
    iter_samples_per_prompt: int = 4
    iter_steps: int = 40
    iter_lr: float = 2e-4
    temperature: float = 1.0
    extra: dict = field(default_factory=dict)

    def checkpoint_steps(self) -> list[int]:
        """The DPO steps at which a checkpoint is saved (10 %, 20 %, 40 %, 100 % by default)."""
        return sorted({max(1, round(f * self.dpo_steps)) for f in self.checkpoint_fractions})


SMOKE = {
    "sft_examples": 256,
    "sft_epochs": 1,
    "dpo_pairs": 160,
    "dpo_steps": 10,
    "dpo_batch": 8,
    "iterations": 3,
    "iter_prompts": 16,
    "iter_samples_per_prompt": 2,
    "iter_steps": 2,
    "iter_lr": 2e-4,
}


def seed_everything(seed: int) -> None:
    """Python, torch (and thus transformers) RNGs."""
    from transformers import set_seed

    random.seed(seed)
    set_seed(seed)


def build_model(out_dir: Path, settings: Settings) -> Path:
    """A randomly initialised tiny Llama with the toy tokenizer, saved as float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = toy_task.build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden,
        intermediate_size=settings.hidden * 4,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    seed_everything(settings.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save(model, tokenizer, out_dir)


def save(model, tokenizer, out_dir: Path) -> Path:
    """save_pretrained of model (float32) and tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def load(model_dir: Path):
    """(model in float32, eval mode; tokenizer) from a checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    return model, tokenizer


def _common_args(settings: Settings, out_dir: Path, *, lr: float, batch: int) -> dict:
    """TrainingArguments shared by SFT and DPO: CPU, fp32, no saving/logging side effects."""
    return {
        "output_dir": str(out_dir / "trainer"),
        "learning_rate": lr,
        "per_device_train_batch_size": batch,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "seed": settings.seed,
        "data_seed": settings.seed,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 10,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "max_length": 64,
    }


def train_sft(init_dir: Path, out_dir: Path, settings: Settings) -> Path:
    """SFT on the mediocre demonstrations (TRL ``SFTTrainer``, loss on completions only)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    train_prompts, _ = toy_task.split_prompts(settings.seed)
    rows = toy_task.sft_dataset(train_prompts, settings.sft_examples, seed=settings.seed + 1)
    model, tokenizer = load(init_dir)
    args = SFTConfig(
        **_common_args(settings, out_dir, lr=settings.sft_lr, batch=settings.sft_batch),
        num_train_epochs=settings.sft_epochs,
        completion_only_loss=True,
    )
    seed_everything(settings.seed)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[_Progress("SFT")],
    )
    _quiet(trainer)
    trainer.train()
    _write_log(trainer, out_dir / "sft_log.json")
    return save(trainer.model, tokenizer, out_dir / "sft")


class _SaveAtSteps:
    """A TrainerCallback that saves the policy at the given global steps."""

    def __new__(cls, steps: Sequence[int], directory_for_step, tokenizer):
        from transformers import TrainerCallback

        class SaveAtSteps(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step in steps:
                    save(model, tokenizer, directory_for_step(state.global_step))
                return control

        return SaveAtSteps()


class _Progress:
    """A tqdm bar over training steps, as a TrainerCallback."""

    def __new__(cls, label: str):
        from transformers import TrainerCallback

        class Progress(TrainerCallback):
            bar = None

            def on_train_begin(self, args, state, control, **kwargs):
                self.bar = tqdm(total=state.max_steps, desc=label, leave=False)

            def on_step_end(self, args, state, control, **kwargs):
                self.bar.update(1)
                loss = state.log_history[-1].get("loss") if state.log_history else None
                if loss is not None:
                    self.bar.set_postfix(loss=f"{loss:.3f}")

            def on_train_end(self, args, state, control, **kwargs):
                self.bar.close()

        return Progress()


def run_dpo(
    policy_dir: Path,
    reference_dir: Path,
    pairs: list[dict[str, str]],
    out_dir: Path,
    settings: Settings,
    *,
    steps: int,
    lr: float,
    save_steps: dict[int, Path] | None = None,
    label: str = "DPO",
) -> Path:
    """DPO (TRL ``DPOTrainer``, sigmoid loss) from ``policy_dir`` against the fixed reference."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load(policy_dir)
    reference, _ = load(reference_dir)
    model.train()
    args = DPOConfig(
        **_common_args(settings, out_dir, lr=lr, batch=settings.dpo_batch),
        max_steps=steps,
        beta=settings.beta,
        loss_type=["sigmoid"],
    )
    callbacks = [_Progress(label)]
    if save_steps:
        callbacks.append(_SaveAtSteps(save_steps, save_steps.__getitem__, tokenizer))
    seed_everything(settings.seed)
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    _quiet(trainer)
    trainer.train()
    _write_log(trainer, out_dir / f"{label.lower().replace(' ', '_')}_log.json")
    return save(trainer.model, tokenizer, out_dir / "final") if not save_steps else out_dir


def _quiet(trainer) -> None:
    """Drop the callback that prints every log dict (our tqdm bar shows the loss)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _write_log(trainer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trainer.state.log_history, indent=1))


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    seed: int,
    temperature: float = 1.0,
    max_new_tokens: int = toy_task.MAX_NEW_TOKENS,
    batch: int = 256,
) -> list[str]:
    """One sampled completion per prompt (all toy prompts have the same length: no padding)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    completions: list[str] = []
    try:
        for start in range(0, len(prompts), batch):
            chunk = list(prompts[start : start + batch])
            encoded = tokenizer(chunk, return_tensors="pt", padding=True)
            output = model.generate(
                **encoded,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = output[:, encoded["input_ids"].shape[1] :]
            completions += [" " + tokenizer.decode(row, skip_special_tokens=False) for row in new]
    finally:
        torch.random.set_rng_state(generator_state)
    return completions


def train_dpo_checkpoints(sft_dir: Path, out_dir: Path, settings: Settings) -> dict[int, Path]:
    """DPO on off-policy pairs, checkpoints at the configured fractions of the steps."""
    train_prompts, _ = toy_task.split_prompts(settings.seed)
    pairs = toy_task.offline_preference_pairs(
        train_prompts, settings.dpo_pairs, seed=settings.seed + 2
    )
    (out_dir / "dpo_pairs.jsonl").parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "dpo_pairs.jsonl", pairs)
    steps = settings.checkpoint_steps()
    targets = {step: out_dir / f"dpo_step{step:04d}" for step in steps}
    run_dpo(
        sft_dir,
        sft_dir,
        pairs,
        out_dir,
        settings,
        steps=settings.dpo_steps,
        lr=settings.dpo_lr,
        save_steps=targets,
    )
    return targets


def train_iterative(sft_dir: Path, out_dir: Path, settings: Settings) -> list[Path]:
    """Iterative DPO: θ_t = DPO(θ_{t−1}; on-policy pairs from θ_{t−1}; reference θ₀ fixed)."""
    train_prompts, _ = toy_task.split_prompts(settings.seed)
    rng = random.Random(settings.seed + 3)
    policy_dir, produced = sft_dir, []
    for t in range(1, settings.iterations + 1):
        prompts = [rng.choice(train_prompts) for _ in range(settings.iter_prompts)]
        model, tokenizer = load(policy_dir)
        k = settings.iter_samples_per_prompt
        flat = [p for p in prompts for _ in range(k)]
        completions = sample(
            model, tokenizer, flat, seed=settings.seed + 100 + t, temperature=settings.temperature
        )
        candidates = [completions[i * k : (i + 1) * k] for i in range(len(prompts))]
        pairs = toy_task.preference_pairs(prompts, candidates)
        _write_jsonl(out_dir / f"iter{t}_pairs.jsonl", pairs)
        rewards = [toy_task.gold_reward(p, c) for p, c in zip(flat, completions, strict=True)]
        LOG.info("iteration %d: %d pairs, mean R of samples %.3f", t, len(pairs), _mean(rewards))
        run_dpo(
            policy_dir,
            sft_dir,
            pairs,
            out_dir / f"iter{t}",
            settings,
            steps=settings.iter_steps,
            lr=settings.iter_lr,
            label=f"iterative DPO {t}",
        )
        policy_dir = out_dir / f"iter{t}" / "final"
        produced.append(policy_dir)
    return produced


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(1, len(values))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def settings_dict(settings: Settings) -> dict:
    """JSON-ready settings, with the derived checkpoint steps."""
    return {**asdict(settings), "checkpoint_steps": settings.checkpoint_steps()}
