"""A second score per candidate (the guard) and the winner rule that respects it.

The iterative-merging paper picks (λ, α) as "the highest average reward without loss of average
score on academic benchmarks". Here the guard is that second score: a callable or a reward
model applied to the responses the search sampled anyway, or ``loglik:TEXTS.jsonl``, the mean
per-token log-likelihood of reference texts (SFT demonstrations, general text) under the
candidate, which needs no generation. The winner maximises the reward among candidates whose
guard has not dropped by more than ε below the α = 0 candidate (θ_T itself).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergekit_expo.search.merge_config import SearchConfigError
from mergekit_expo.search.prompts import JsonlError, _records, file_digest
from mergekit_expo.search.scorers import (
    CallableScorer,
    RewardModelScorer,
    Scores,
    sequence_log_probs,
)

TEXT_EXAMPLE = '{"text": "..."} or {"prompt": "...", "completion": "..."}'


def parse_guard(spec: str, *, device: str = "cpu", batch_size: int = 8,
                lm_eval_args: dict[str, Any] | None = None):
    """``loglik:TEXTS.jsonl``, ``lm-eval:TASKS``, a reward-model directory, or
    ``module:function``."""
    kind, sep, rest = spec.partition(":")
    if kind == "lm-eval" and sep:
        from mergekit_expo.search.lm_eval_guard import LmEvalGuard

        return LmEvalGuard(rest, lm_eval_args, batch_size=batch_size)
    if kind == "loglik" and sep:
        return LogLikelihoodGuard(Path(rest), batch_size=batch_size)
    if Path(spec).is_dir():
        return ResponseGuard(RewardModelScorer(spec, device=device, batch_size=batch_size))
    return ResponseGuard(CallableScorer(spec, role="guard"))


class ResponseGuard:
    """A reward model or callable, scoring the responses already sampled for the reward."""

    needs_responses = True

    def __init__(self, scorer):
        self.scorer = scorer

    def identity(self) -> dict[str, Any]:
        return {"guard": self.scorer.identity()}

    def prepare(self, tokenizer, chat: bool, *, progress: bool = True) -> None:
        self.scorer.prepare(progress=progress)

    def score(self, model, prompts, responses, *, progress: bool = True) -> Scores:
        return self.scorer.score(prompts, responses, progress=progress)


class LogLikelihoodGuard:
    """Mean over texts of the per-token log-likelihood log π(text) / tokens (completion only
    when a record has a prompt), with the prompt encoded as for generation."""

    needs_responses = False

    def __init__(self, path: Path, *, batch_size: int = 8):
        self.path, self.batch_size = path, batch_size
        self.records = _read_texts(path)
        self.sequences: list[tuple[list[int], int]] = []

    def identity(self) -> dict[str, Any]:
        return {"guard": {"kind": "loglik", "sha256": file_digest(self.path)}}

    def prepare(self, tokenizer, chat: bool, *, progress: bool = True) -> None:
        from mergekit_expo.search.generation import encode_prompt

        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.sequences = []
        for prompt, completion in self.records:
            if prompt is None:
                ids = tokenizer(completion)["input_ids"]
                self.sequences.append((ids, 0))
            else:
                head = encode_prompt(tokenizer, prompt, chat)
                tail = tokenizer(completion, add_special_tokens=False)["input_ids"]
                self.sequences.append((head + tail, len(head)))

    def score(self, model, prompts, responses, *, progress: bool = True) -> Scores:
        totals = sequence_log_probs(
            model, self.sequences, pad=self.pad, batch_size=self.batch_size, progress=progress,
            desc="guard log π",
        )
        counts = [len(ids) - max(start, 1) for ids, start in self.sequences]
        return Scores([float(t) / max(c, 1) for t, c in zip(totals.tolist(), counts, strict=True)])


def _read_texts(path: Path) -> list[tuple[str | None, str]]:
    records = []
    for line, record in _records(path, TEXT_EXAMPLE):
        if "text" in record and isinstance(record["text"], str) and record["text"].strip():
            records.append((None, record["text"]))
            continue
        completion = record.get("completion", record.get("response"))
        if isinstance(record.get("prompt"), str) and isinstance(completion, str) and completion:
            records.append((record["prompt"], completion))
            continue
        raise JsonlError(path, line, "needs a non-empty `text`, or `prompt` and `completion`",
                         TEXT_EXAMPLE)
    if not records:
        raise JsonlError(path, 1, "the file holds no texts", TEXT_EXAMPLE)
    return records


# -- selection -----------------------------------------------------------------------------


def baseline(rows: Sequence[dict[str, Any]]) -> float | None:
    """The guard of the α = 0, λ = 0 candidate (θ_T), the reference point of every drop."""
    for row in rows:
        if row and row.get("alpha") == 0 and row.get("lambda") == 0:
            return row.get("guard_mean")
    return None


def annotate(rows: Sequence[dict[str, Any]], base: float | None, max_drop: float | None) -> None:
    """Add ``guard_drop`` (baseline − guard) and ``feasible`` to each scored row, in place."""
    for row in rows:
        if row is None or row.get("mean") is None or row.get("guard_mean") is None:
            continue
        row["guard_drop"] = base - row["guard_mean"] if base is not None else None
        row["feasible"] = max_drop is None or (
            row["guard_drop"] is not None and row["guard_drop"] <= max_drop
        )


def pick_guarded_winner(rows: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Highest reward among feasible rows; earlier rows win ties; failures never win."""
    best = None
    for row in rows:
        if row is None or row.get("mean") is None or row.get("feasible") is False:
            continue
        if best is None or row["mean"] > best["mean"]:
            best = row
    return best


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both reward and guard (≥ on both, > on one), by guard."""
    scored = [r for r in rows if r.get("mean") is not None and r.get("guard_mean") is not None]
    front = []
    for row in scored:
        dominated = any(
            o["mean"] >= row["mean"] and o["guard_mean"] >= row["guard_mean"]
            and (o["mean"] > row["mean"] or o["guard_mean"] > row["guard_mean"])
            for o in scored
        )
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda r: r["guard_mean"])


def guard_summary(scores: Scores) -> dict[str, Any]:
    sem = scores.sem if len(scores.values) > 1 else 0.0
    return {"guard_mean": scores.mean, "guard_sem": sem if math.isfinite(sem) else None,
            "guard_n": len(scores.values)}


def make_guard(settings, scorer):
    if settings.guard is None:
        return None
    guard = parse_guard(settings.guard, device=settings.device,
                        batch_size=settings.sampling.batch_size,
                        lm_eval_args=settings.lm_eval_args)
    if guard.needs_responses and not scorer.generates:
        raise SearchConfigError(
            f"--guard {settings.guard} scores sampled responses, but the {settings.scorer.kind} "
            "scorer samples none; use --guard loglik:TEXTS.jsonl (or lm-eval:TASKS) with it"
        )
    return guard
