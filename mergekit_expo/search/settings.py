"""What one search run was asked to do: the grid, the scorer, sampling and outputs, validated.

Checked before any model is read, so that a bad grid value or a scorer without its prompts fails
at once, not an hour into a search.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

PAPER_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5)


class SamplingSettings(BaseModel):
    """Decoding settings; all part of the results key, so changing one starts fresh rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.7, ge=0.0, description="0 means greedy decoding")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0, description="0 disables top-k")
    max_new_tokens: int = Field(256, ge=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1)
    chat_template: Literal["auto", "on", "off"] = "auto"


def _finite_list(values: list[float]) -> list[float]:
    if not values:
        raise ValueError("the grid is empty")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"grid values must be finite, got {bad}")
    return list(dict.fromkeys(float(v) for v in values))  # unique, in the order given


Grid = Annotated[list[float], AfterValidator(_finite_list)]


class CallableScorerSpec(BaseModel):
    kind: Literal["callable"] = "callable"
    function: str = Field(description="module:function or path/to/file.py:function")


class RewardModelSpec(BaseModel):
    kind: Literal["reward_model"] = "reward_model"
    path: str
    engine: Literal["hf", "vllm"] = "hf"  # vllm: a pooling engine (search/vllm_reward.py)


class DpoSpec(BaseModel):
    kind: Literal["dpo"] = "dpo"
    pairs: Path
    beta: float = Field(0.1, gt=0)


class LmEvalSpec(BaseModel):
    """``--scorer lm-eval:TASKS``: the tasks' metric on the candidate (``lm_eval_args`` apply)."""

    kind: Literal["lm_eval"] = "lm_eval"
    tasks: str = Field(description="comma-separated lm-eval task names")


NO_PROMPTS = ("dpo", "lm_eval")  # scorers that sample no answers to prompts


class SearchSettings(BaseModel):
    """Everything one search run needs, validated before any model is touched."""

    model_config = ConfigDict(extra="forbid")

    config: Path
    out_dir: Path
    alphas: Grid = list(PAPER_ALPHAS)
    lambdas: Grid | None = None  # None: the config's scalar lambda, else 0
    prompts: Path | None = None
    scorer: CallableScorerSpec | RewardModelSpec | DpoSpec | LmEvalSpec = Field(
        discriminator="kind")
    sampling: SamplingSettings = SamplingSettings()
    device: str = "cpu"
    # keep θ₀/θ_T/θ̄ resident on --device: auto = on an accelerator when they fit (docs/search.md)
    inputs_on_device: Literal["auto", "yes", "no"] = "auto"
    limit: int | None = Field(None, ge=1, description="use only the first N prompts/pairs")
    write_best: Path | None = None
    save_responses: bool = False
    progress: bool = True
    # per-group α (docs/search.md, "Per-module α"): groups, Optuna trials, guard, hold-out
    groups: list[str] = []  # presets ("modules", "attention", ...) or NAME=FILTER[+FILTER]
    layer_bands: int | None = Field(None, ge=1)
    trials: int = Field(0, ge=0)
    trial_seed: int = 0
    trial_alpha: tuple[float, float] | None = None  # default: the α grid's range
    trial_step: float | None = Field(0.05, gt=0)
    guard: str | None = None  # loglik:TEXTS.jsonl, a reward-model directory, or module:function
    max_guard_drop: float | None = Field(None, ge=0)
    holdout_prompts: Path | None = None
    holdout_fraction: float | None = Field(None, gt=0, lt=1)
    # at scale (docs/search.md, "At scale"): the engine, its vLLM arguments, Ray workers
    engine: Literal["auto", "hf", "vllm"] = "auto"
    vllm_args: dict[str, Any] = {}
    workers: int = Field(1, ge=1)
    ray_address: str | None = None
    worker_gpus: float = Field(0, ge=0)
    lm_eval_args: dict[str, Any] = {}  # lm-eval:TASKS (guard, scorer): to simple_evaluate

    @model_validator(mode="after")
    def _needs_prompts(self) -> SearchSettings:
        if self.scorer.kind not in NO_PROMPTS and self.prompts is None:
            raise ValueError("a reward-model or callable scorer needs held-out prompts (--prompts)")
        if self.scorer.kind == "lm_eval" and (self.holdout_prompts or self.holdout_fraction):
            raise ValueError("--scorer lm-eval:TASKS scores whole tasks: hold-out options split "
                             "prompts or pairs; name held-out tasks in a second run instead")
        return self

    @model_validator(mode="after")
    def _consistent_extensions(self) -> SearchSettings:
        if self.trials and not (self.groups or self.layer_bands):
            raise ValueError("--trials searches α per group: give --groups and/or --layer-bands")
        if self.max_guard_drop is not None and self.guard is None:
            raise ValueError("--max-guard-drop needs a --guard")
        if self.holdout_prompts is not None and self.holdout_fraction is not None:
            raise ValueError("give --holdout-prompts or --holdout-fraction, not both")
        if self.trial_alpha is not None and not self.trial_alpha[0] < self.trial_alpha[1]:
            raise ValueError(f"--trial-alpha {self.trial_alpha}: need low < high")
        return self


def parse_grid(values: tuple[str, ...] | list[str]) -> list[float] | None:
    """``0.1,0.2,0.5`` and inclusive ranges ``start:stop:step`` (``0.1:0.5:0.1``); None if empty."""
    grid: list[float] = []
    for value in values:
        for part in str(value).replace(" ", "").split(","):
            if not part:
                continue
            if ":" in part:
                grid += _range(part)
            else:
                try:
                    grid.append(float(part))
                except ValueError:
                    raise ValueError(f"grid value {part!r} is not a number") from None
    return grid or None


def _range(text: str) -> list[float]:
    try:
        start, stop, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"grid range {text!r}: write start:stop:step, e.g. 0.1:0.5:0.1") from None
    if not step > 0 or stop < start:
        raise ValueError(f"grid range {text!r}: need step > 0 and stop >= start")
    steps = (stop - start) / step
    if abs(steps - round(steps)) > 1e-6:
        raise ValueError(f"grid range {text!r}: (stop - start) is not a multiple of step")
    return [round(start + i * step, 10) for i in range(round(steps) + 1)]


def parse_options(text: str | None, flag: str) -> dict[str, Any]:
    """``K=V,K=V`` (``--vllm-args``, ``--lm-eval-args``) as keyword arguments for the library
    they pass through to, each value read as a YAML scalar (``2`` an int, ``true`` a bool)."""
    import yaml

    options: dict[str, Any] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {part!r}: write key=value")
        options[key.strip()] = yaml.safe_load(value)
    return options
