"""lm-eval's vLLM model class over the search's running engine (no second engine, no files).

:class:`EngineLM` is ``lm_eval.models.vllm_causallms.VLLM`` with a constructor that takes an
existing ``vllm.LLM`` and the search's tokenizer instead of building both from a path: lm-eval's
own request handling (tokenization, batching, ``prompt_logprobs`` for log-likelihoods,
``generate_until``) then runs on the candidate's weights as the engine holds them.
"""

from __future__ import annotations

from lm_eval.models.vllm_causallms import VLLM


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
