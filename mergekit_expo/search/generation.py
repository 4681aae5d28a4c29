"""Sampling answers to held-out prompts with transformers, the same way for every candidate.

The defaults (``settings.SamplingSettings``) are the papers' decoding settings (temperature 0.7,
top-p 0.9, top-k 40). Each candidate samples after seeding afresh with the same seed, so every
candidate sees the same random numbers: differences between candidates then come from the
weights, not from sampling noise (common random numbers).

Nothing here changes the process for good: transformers' ``generate`` draws from torch's global
RNG (it takes no generator), so each candidate samples inside ``torch.random.fork_rng`` after
``torch.manual_seed`` (:func:`seeded`), and the caller's RNG state is back afterwards;
transformers' progress bars are turned off only for the duration of a load
(:func:`progress_bars`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from mergekit_expo.search.settings import SamplingSettings

LOG = logging.getLogger("mergekit_expo")


@dataclass(frozen=True)
class Response:
    text: str
    tokens: int  # generated tokens before the first end-of-sequence token


def load_tokenizer(search, *, side: Literal["left", "right"] = "left"):
    """θ_T's tokenizer, with the config's ``chat_template:`` applied as mergekit applies it."""
    from transformers import AutoTokenizer

    from mergekit_expo.patches.reads import set_chat_template  # the merge's own template

    tokenizer = AutoTokenizer.from_pretrained(search.final.local_path(ignore_lora=True))
    try:
        set_chat_template(tokenizer, search.merge_config)
    except Exception as error:  # noqa: BLE001 - a template problem must not stop the search
        LOG.warning("expo search: could not apply chat_template from the config: %s", error)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = side
    _warn_if_tokenizers_differ(search, tokenizer)
    return tokenizer


def uses_chat_template(tokenizer, mode: str) -> bool:
    if mode == "off":
        return False
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "on" and not has_template:
        raise ValueError("--chat-template on, but the final model's tokenizer has no chat template")
    return has_template


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of the prompt as the model expects it (chat template with generation prompt)."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """``torch.manual_seed(seed)`` inside, so that every candidate samples the same random
    numbers; on leaving, the process's random state (CPU and every accelerator of the kind
    torch uses) is as it was (``torch.random.fork_rng``)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; CUDA only before
    kind = accelerator.current_accelerator() if accelerator is not None else (
        torch.device("cuda") if torch.cuda.is_available() else None)
    count = 0 if kind is None else getattr(torch, kind.type).device_count()
    device_type = "cuda" if kind is None else kind.type
    with torch.random.fork_rng(devices=list(range(count)), device_type=device_type):
        torch.manual_seed(seed)
        yield


class Sampler:
    """Generates one response per prompt; prompts are tokenized once, batched by length."""

    def __init__(self, model, tokenizer, prompts: list[str], settings: SamplingSettings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        chat = uses_chat_template(tokenizer, settings.chat_template)
        self.prompt_ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
        # longest first: a too-long prompt fails in the first batch, and padding stays small
        self.order = sorted(range(len(prompts)), key=lambda i: -len(self.prompt_ids[i]))
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    @torch.no_grad()
    def generate(self, *, progress: bool = True, desc: str = "Generating") -> list[Response]:
        """One candidate's responses, sampled after seeding afresh (same seed, same numbers)."""
        settings = self.settings
        results: list[Response | None] = [None] * len(self.prompt_ids)
        batches = [
            self.order[i : i + settings.batch_size]
            for i in range(0, len(self.order), settings.batch_size)
        ]
        with seeded(settings.seed):
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                for index, response in zip(batch, self._generate_batch(batch), strict=True):
                    results[index] = response
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[int]) -> list[Response]:
        settings = self.settings
        device = self.model.device
        width = max(len(self.prompt_ids[i]) for i in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = self.prompt_ids[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids) :] = 1
        sampling = (
            {
                "do_sample": True,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "top_k": settings.top_k,
            }
            if settings.temperature > 0
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        output = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=pad,
            **sampling,
        )
        responses = []
        for row in output[:, width:].tolist():
            end = next((k for k, token in enumerate(row) if token in self.eos_ids), len(row))
            tokens = row[:end]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            responses.append(Response(text=text, tokens=len(tokens)))
        return responses


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' (and huggingface_hub's) progress bars off inside unless ``enabled``; on
    leaving, each is as it was before (on stays on, off stays off, per-group hub states too)."""
    if enabled:  # the caller's choice stands, whatever it is
        yield
        return
    from transformers.utils import logging as hf_logging

    state = bar_state()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        restore_bars(state)


def bar_state() -> tuple[bool, dict]:
    """(transformers' bars on?, huggingface_hub's per-group bar states)."""
    from transformers.utils import logging as hf_logging

    hub = importlib.import_module("huggingface_hub.utils.tqdm")  # the module, not the class
    return hf_logging.is_progress_bar_enabled(), dict(hub.progress_bar_states)


def restore_bars(state: tuple[bool, dict]) -> None:
    """Put back a :func:`bar_state`."""
    from transformers.utils import logging as hf_logging

    was_enabled, hub_states = state
    if was_enabled != hf_logging.is_progress_bar_enabled():
        with warnings.catch_warnings():  # an HF_HUB_DISABLE_PROGRESS_BARS the user set wins
            warnings.simplefilter("ignore")
            if was_enabled:
                hf_logging.enable_progress_bar()
            else:
                hf_logging.disable_progress_bar()
    hub = importlib.import_module("huggingface_hub.utils.tqdm")
    hub.progress_bar_states.clear()
    hub.progress_bar_states.update(hub_states)


def progress_bars_as_asked(init):
    """Decorates an ``__init__(..., progress=...)`` that loads models: with ``progress=False``,
    transformers' bars are off while it runs and as they were once it returns (or raises)."""

    @functools.wraps(init)
    def wrapper(self, *args, progress: bool = True, **kwargs):
        with progress_bars(progress):
            return init(self, *args, progress=progress, **kwargs)

    return wrapper


def _warn_if_tokenizers_differ(search, tokenizer) -> None:
    """mergekit copies θ₀'s tokenizer into the merged model; the search uses θ_T's."""
    from transformers import AutoTokenizer

    try:
        reference = AutoTokenizer.from_pretrained(search.reference.local_path(ignore_lora=True))
    except Exception:  # noqa: BLE001 - θ₀ without a tokenizer: nothing to compare
        return
    if reference.get_vocab() != tokenizer.get_vocab():
        LOG.warning(
            "expo search: the tokenizers of θ₀ (%s) and θ_T (%s) differ; the search generates "
            "with θ_T's, while mergekit-yaml copies θ₀'s into the merged model unless "
            "`tokenizer_source` says otherwise",
            search.reference,
            search.final,
        )
