"""Scoring one candidate: set its weights, sample and score (reward and guard), one row.

Set up once per run (the model, the tokenizer, the sampler, the scorer's and the guard's
preparations) and used by the grid, the per-group trials and the hold-out check alike, so the
three score candidates the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_expo.search.weights import GroupedWeights, UniformWeights


class Evaluator:
    """The candidate model with everything needed to score it on the search's data."""

    def __init__(self, settings, search, scorer, data, *, assignment: Mapping[str, str],
                 guard=None, need_intermediates: bool = False):
        from mergekit_expo.search.candidates import CandidateWeights
        from mergekit_expo.search.generation import load_tokenizer, uses_chat_template

        self.settings, self.scorer, self.data, self.guard = settings, scorer, data, guard
        started = time.perf_counter()
        if search.uses_adapters:  # only the LoRA scalings change per candidate
            from mergekit_expo.search.adapter_candidates import AdapterWeights

            weights = AdapterWeights(
                search, device=settings.device, need_intermediates=need_intermediates,
                progress=settings.progress,
            )
            self.weights = UniformWeights(weights)
        elif settings.engine == "vllm":  # one vLLM engine, its weights streamed per candidate
            from mergekit_expo.search.vllm_engine import engine_weights

            weights = engine_weights(settings, search, scorer, guard,
                                     need_intermediates=need_intermediates)
            self.weights = GroupedWeights(weights, assignment)
        else:
            weights = CandidateWeights(
                search, device=settings.device, need_intermediates=need_intermediates,
                progress=settings.progress, inputs_on_device=settings.inputs_on_device,
            )
            self.weights = GroupedWeights(weights, assignment)
        self.candidates = weights
        self.read_seconds = time.perf_counter() - started  # model built, inputs mapped or read
        self.update_times: list[float] = []  # seconds to set each candidate's weights
        self.tokenizer = load_tokenizer(search, side="left")
        self.chat = uses_chat_template(self.tokenizer, settings.sampling.chat_template)
        self.sampler = self.prepare(scorer, data)
        if guard is not None:
            guard.prepare(self.tokenizer, self.chat, progress=settings.progress)

    def prepare(self, scorer, data):
        """A sampler for a generating scorer (None for DPO accuracy, prepared with θ₀ here)."""
        from mergekit_expo.search.generation import Sampler

        if scorer.generates:
            scorer.prepare(progress=self.settings.progress)
            if self.settings.engine == "vllm":
                from mergekit_expo.search.vllm_engine import VllmSampler

                return VllmSampler(self.weights.model, self.tokenizer, data,
                                   self.settings.sampling)
            return Sampler(self.weights.model, self.tokenizer, data, self.settings.sampling)
        scorer.prepare(self.weights, self.tokenizer, self.chat, progress=self.settings.progress)
        return None

    def measure(self, values: Mapping[str, Sequence[float]], *, scorer=None, data=None,
                sampler=None) -> dict[str, Any]:
        """The row fields of one candidate (group → (α, λ)); another data split if given."""
        from mergekit_expo.search.candidates import CandidateOverflow

        scorer = scorer or self.scorer
        data = self.data if data is None else data
        sampler = self.sampler if sampler is None and data is self.data else sampler
        progress = self.settings.progress
        row: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            self.weights.set(values)
        except CandidateOverflow as error:
            return {"mean": None, "error": str(error)}
        self.update_times.append(time.perf_counter() - started)
        row["update_seconds"] = round(self.update_times[-1], 3)
        texts = None
        if sampler is not None:
            responses = sampler.generate(progress=progress)
            texts = [r.text for r in responses]
            scores = scorer.score(data, texts, progress=progress)
            lengths = [r.tokens for r in responses]
            row.update(
                summary(scores),
                mean_length_tokens=statistics.fmean(lengths),
                mean_length_chars=statistics.fmean(len(t) for t in texts),
                scores=scores.values,
                lengths=lengths,
            )
            if self.settings.save_responses:
                row["responses"] = texts
        else:
            scores = scorer.evaluate(self.weights.model, progress=progress)
            row.update(summary(scores), mean_length_tokens=None, scores=scores.values)
        row.update(scores.extras)
        if self.guard is not None and data is self.data:
            from mergekit_expo.search.capability import guard_summary

            prompts = data if texts is not None else None
            guarded = self.guard.score(self.weights.model, prompts, texts, progress=progress)
            row.update(guard_summary(guarded))
        return row


def summary(scores) -> dict[str, Any]:
    return {"mean": scores.mean, "std": scores.std, "sem": scores.sem, "n": len(scores.values)}
