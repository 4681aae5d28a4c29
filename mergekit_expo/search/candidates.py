"""One model in memory whose weights become each (α, λ) candidate in place.

θ₀, θ_T and the intermediates are opened once through mergekit's own tensor loader, which maps
the safetensors files: they stay file pages (reclaimable page cache), not private memory. Each
candidate is written into the model's parameters tensor by tensor with
:func:`mergekit_expo.merge.formula.extrapolate` — the kernel of the merge method, which also
averages the intermediates into θ̄ slice by slice in float64 — after casting each input exactly
as the merge casts it (``dtype:``, one tensor at a time), then cast as the merge casts its output
(``out_dtype:``). A candidate is therefore bit-identical to what ``mergekit-yaml`` would write for
the same α and λ, and private memory is the model plus one tensor, whatever the number of
intermediates. ``inputs_on_device`` instead keeps the inputs resident on the model's device (a
GPU), so that a candidate needs no host traffic.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mergekit_expo.merge.formula import extrapolate, extrapolate_checked
from mergekit_expo.merge.guards import NonFiniteError, overflow_message, relative_change
from mergekit_expo.search.generation import progress_bars_as_asked
from mergekit_expo.search.merge_config import SearchConfig, SearchConfigError

LOG = logging.getLogger("mergekit_expo")

# Config keys that legitimately differ between θ₀ and θ_T without changing the network.
CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}
# Resident inputs must leave this much of the device's free memory for generation and scoring
# (activations, KV cache, a reward model): the larger of 1 GiB and 10 % of what is free.
RESIDENT_RESERVE_BYTES = 1 << 30
RESIDENT_RESERVE_SHARE = 0.1
INPUTS_ON_DEVICE = ("auto", "yes", "no")


class CandidateOverflow(NonFiniteError):
    """This (α, λ) overflows the output dtype; the merge would refuse it too."""


@dataclass
class _Target:
    name: str  # checkpoint tensor name
    parameter: torch.Tensor  # the model's tensor, overwritten in place
    final: torch.Tensor
    reference: torch.Tensor | None = None  # stays None for non-float tensors (merge copies θ_T)
    intermediates: tuple[torch.Tensor, ...] = ()
    dtype: torch.dtype | None = None  # what the merge's kernel sees (after ``dtype:``)
    summed: int | None = None  # resident: the intermediates summed exactly into one float64

    @property
    def floating(self) -> bool:
        return (self.dtype or self.final.dtype).is_floating_point


class CandidateWeights:
    """Inputs held once; :meth:`apply` turns the model into one candidate, in place."""

    @progress_bars_as_asked  # progress=False: transformers' bars off while loading, then as before
    def __init__(
        self,
        search: SearchConfig,
        *,
        device: str = "cpu",
        need_intermediates: bool = False,
        progress: bool = True,
        inputs_on_device: str = "auto",
    ):
        from mergekit.common import dtype_from_name

        if inputs_on_device not in INPUTS_ON_DEVICE:
            raise ValueError(f"inputs_on_device must be one of {INPUTS_ON_DEVICE}")
        self.resident = False  # inputs copied onto the model's device (else mapped on the host)

        self.search = search
        self.input_dtype = dtype_from_name(search.input_dtype)
        self.out_dtype = dtype_from_name(search.out_dtype)
        loaders = {"final": search.final.lazy_loader(lazy_unpickle=False)}
        final_tensors = {}
        names = list(loaders["final"].index.tensor_paths)
        for name in tqdm(names, desc="Reading θ_T", disable=not progress, leave=False):
            final_tensors[name] = loaders["final"].get_tensor(name)  # mapped, cast when used
        loaders["final"].flush()
        self.merge_dtypes = self._merge_dtypes(final_tensors)
        weights = Counter()  # elements per dtype the merge writes, before out_dtype
        for name, tensor in final_tensors.items():
            if tensor.is_floating_point():
                weights[self.merge_dtypes[name]] += tensor.numel()
        self.tensor_dtype = weights.most_common(1)[0][0] if weights else torch.float32
        self.model_dtype = self.out_dtype or self.tensor_dtype
        self.model = self._load_model(device)
        self.targets = self._bind(final_tensors)
        del final_tensors
        self._read_reference_and_intermediates(need_intermediates, progress)
        self._warn_if_unrelated()
        self._place_inputs(inputs_on_device, progress)
        self.update_seconds: float | None = None  # of the last apply()

    # -- reading ---------------------------------------------------------------------------

    def _load_model(self, device: str):
        """What generates: a transformers model here (a vLLM engine in ``vllm_engine``)."""
        return load_model(self.search, self.model_dtype, device)

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor as the merge's kernel sees it (``dtype:``); resident inputs are cast
        already (and a resident float64 sum of the intermediates must stay float64)."""
        if self.resident or self.input_dtype is None or tensor.dtype == self.input_dtype:
            return tensor
        return tensor.to(self.input_dtype)

    def _merge_dtypes(self, final_tensors: dict[str, torch.Tensor]) -> dict[str, torch.dtype]:
        """Per tensor, the dtype the merge computes and rounds to before ``out_dtype``: the
        plan's (``dtype:``, else mergekit's promotion of every input of the tensor)."""
        planned = self.search.working_dtypes()
        dtypes = {}
        for name, tensor in final_tensors.items():
            working = planned.get(name)
            if working is not None and tensor.dtype.is_floating_point:
                dtypes[name] = getattr(torch, working)
            elif self.input_dtype is not None and tensor.dtype.is_floating_point:
                dtypes[name] = self.input_dtype
            else:
                dtypes[name] = tensor.dtype
        return dtypes

    def _bind(self, final_tensors: dict[str, torch.Tensor]) -> list[_Target]:
        """Pair every distinct model tensor with its θ_T tensor (tied weights once)."""
        by_storage: dict[tuple, list[str]] = {}
        state = self.model.state_dict(keep_vars=True)
        for name, tensor in state.items():
            key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape))
            by_storage.setdefault(key, []).append(name)
        targets = []
        for names in by_storage.values():
            found = next((n for n in names if n in final_tensors), None)
            if found is None:
                raise SearchConfigError(
                    f"model tensor {names[0]} has no counterpart in the final checkpoint "
                    f"{self.search.final} (checkpoint names: {_sample(final_tensors)}); the "
                    "search needs checkpoints whose tensor names match the transformers model"
                )
            parameter = state[names[0]]
            final = final_tensors[found]
            if tuple(final.shape) != tuple(parameter.shape):
                raise SearchConfigError(
                    f"tensor {found}: final checkpoint shape {tuple(final.shape)} differs from "
                    f"the model built from its config {tuple(parameter.shape)}"
                )
            dtype = self.merge_dtypes[found]
            targets.append(_Target(found, parameter, final, dtype=dtype))
        return targets

    def _read_reference_and_intermediates(self, need_intermediates: bool, progress: bool) -> None:
        search = self.search
        reference = search.reference.lazy_loader(lazy_unpickle=False)
        models = list(search.intermediates) if need_intermediates else []
        mids = [m.lazy_loader(lazy_unpickle=False) for m in models]
        # all mapped, never averaged up front: the kernel sums them per slice (flat memory)
        for target in tqdm(self.targets, desc="Mapping θ₀, θ_t", disable=not progress,
                           leave=False):
            if not target.floating:
                continue
            target.reference = self._read(reference, search.reference, target)
            target.intermediates = tuple(
                self._read(loader, model, target)
                for loader, model in zip(mids, models, strict=True)
            )
        for loader in (reference, *mids):
            loader.flush()

    def _read(self, loader, model, target: _Target) -> torch.Tensor:
        name = target.name
        if name not in loader.index.tensor_paths:
            raise SearchConfigError(
                f"tensor {name} of the final model {self.search.final} is missing from {model}; "
                "the search needs every model to have the same tensor names and shapes"
            )
        tensor = loader.get_tensor(name)
        if tuple(tensor.shape) != tuple(target.final.shape):
            raise SearchConfigError(
                f"tensor {name}: shape {tuple(tensor.shape)} in {model} differs from "
                f"{tuple(target.final.shape)} in the final model {self.search.final}; the "
                "search needs identical shapes (no vocabulary union)"
            )
        return tensor

    def _place_inputs(self, mode: str, progress: bool) -> None:
        """Copy the inputs onto the model's device if asked (``yes``) or if they fit (``auto``
        on an accelerator); otherwise they stay mapped on the host and stream per candidate."""
        device = next(self.model.parameters()).device
        if mode == "no" or (mode == "auto" and device.type == "cpu"):
            return
        need = resident_bytes(self.targets)
        free = free_device_bytes(device)
        reserve = None if free is None else max(RESIDENT_RESERVE_BYTES,
                                                 int(RESIDENT_RESERVE_SHARE * free))
        fits = free is not None and need + reserve <= free
        if not fits:
            where = "unknown" if free is None else f"{free / 1e9:.2f} GB"
            text = (
                f"the inputs (θ₀, θ_T and the intermediates or their float64 sum) need "
                f"{need / 1e9:.2f} GB on {device}, free memory there is {where}"
                + ("" if reserve is None else f" of which {reserve / 1e9:.2f} GB stay reserved")
            )
            if mode == "yes":
                raise SearchConfigError(
                    f"--inputs-on-device yes: {text}; use --inputs-on-device no (inputs stream "
                    "from the host for every candidate) or a device with more memory"
                )
            LOG.info("expo search: inputs stay on the host (%s)", text)
            return
        for target in tqdm(self.targets, desc=f"Inputs to {device}", disable=not progress,
                           leave=False):
            _make_resident(target, device)
        self.resident = True
        LOG.info("expo search: inputs resident on %s (%.2f GB)", device, need / 1e9)

    def _warn_if_unrelated(self) -> None:
        threshold = self.search.warn_relative_change
        for target in self.targets:
            if target.reference is None:
                continue
            pairs = [(self.search.final, target.final)]
            if len(target.intermediates) == len(self.search.intermediates):  # not averaged
                pairs += list(zip(self.search.intermediates, target.intermediates, strict=True))
            for model, tensor in pairs:
                change = relative_change(tensor, target.reference)  # samples rows, in float32
                if change is not None and change > threshold:
                    LOG.warning(
                        "expo: model %s differs from the reference %s by %.3g of its norm in %s "
                        "(threshold %g): probably not an SFT→aligned pair; extrapolating "
                        "unrelated checkpoints collapses the model",
                        model, self.search.reference, change, target.name, threshold,
                    )
                    return

    # -- candidates ------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self, alpha: float, lam: float, *, only: Collection[str] | None = None) -> None:
        """Overwrite the model's weights with θ(α, λ), exactly as the merge computes them.

        ``only``: the checkpoint names of the tensors to write (a group of tensors with its own
        α and λ, see ``search/grouped.py``); the others keep whatever they hold.
        """
        if lam and not any(t.intermediates for t in self.targets):
            raise SearchConfigError(
                f"lambda = {lam:g} needs intermediate checkpoints: list them under `models:` "
                "before the final one, or search lambda 0 only"
            )
        started = time.perf_counter()
        for target in self.targets:
            if only is not None and target.name not in only:
                continue
            parameter = target.parameter.data
            final = self._cast(target.final)
            if not target.floating:
                parameter.copy_(final)
                continue
            reference = self._cast(target.reference)
            intermediates = tuple(self._cast(t) for t in target.intermediates) if lam else ()
            merge_dtype = self.merge_dtypes[target.name]
            written = self.out_dtype or merge_dtype
            if parameter.dtype == written == merge_dtype and parameter.device == final.device:
                _, finite = extrapolate_checked(
                    reference, final, intermediates, alpha=alpha, lam=lam, out=parameter,
                    mean_of=target.summed,
                )
            else:  # rounded once into what the merge writes (out_dtype), as the merge does
                rounded = torch.empty_like(target.final, dtype=written)
                result = extrapolate(
                    reference, final, intermediates, alpha=alpha, lam=lam, out=rounded,
                    mean_of=target.summed,
                )
                parameter.copy_(result)
                finite = bool(torch.isfinite(result).all())
            if not finite:
                self._raise_if_inputs_not_finite(target, lam)
                raise CandidateOverflow(overflow_message(target.name, written, alpha, lam))
        self.update_seconds = time.perf_counter() - started

    def _raise_if_inputs_not_finite(self, target: _Target, lam: float) -> None:
        """A damaged checkpoint, not this α, when an input itself holds inf/NaN (checked lazily:
        a full pass over every input up front would cost more than a candidate)."""
        search = self.search
        inputs = [(search.reference, target.reference), (search.final, target.final)]
        if not lam:
            pass  # the intermediates took no part
        elif len(target.intermediates) == len(search.intermediates):
            inputs += list(zip(search.intermediates, target.intermediates, strict=True))
        else:  # their float64 sum is non-finite if any of them is
            inputs += [("the intermediate checkpoints", t) for t in target.intermediates]
        for model, tensor in inputs:
            bad = int((~torch.isfinite(self._cast(tensor))).sum())
            if bad:
                raise NonFiniteError(
                    f"expo: input tensor {target.name} of model {model} has {bad} non-finite "
                    "(inf/NaN) values; fix or re-export that model before searching"
                )

    @torch.no_grad()
    def apply_reference(self) -> None:
        """θ₀ itself (the DPO reference policy), in the model's dtype."""
        for target in self.targets:
            source = target.reference if target.floating else target.final
            target.parameter.data.copy_(self._cast(source))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The candidate's tensors by checkpoint name (for checks against a real merge)."""
        return {t.name: t.parameter.detach() for t in self.targets}


def load_model(search: SearchConfig, dtype: torch.dtype, device: str):
    """θ_T's architecture, config and generation settings, to be overwritten in place."""
    from transformers import AutoModelForCausalLM

    path = search.final.local_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    _warn_if_configs_differ(search, model)
    return model.to(device).eval()


def _warn_if_configs_differ(search: SearchConfig, model) -> None:
    """mergekit writes θ₀'s config files; the search uses θ_T's. Say so if they differ."""
    from transformers import GenerationConfig

    reference = search.reference.config().to_dict()
    final = search.final.config().to_dict()
    keys = sorted(
        k for k in set(reference) | set(final)
        if k not in CONFIG_KEYS_IGNORED and reference.get(k) != final.get(k)
    )
    try:
        generation = GenerationConfig.from_pretrained(search.reference.local_path())
    except OSError:  # θ₀ has no generation_config.json: nothing is copied from it either
        generation = None
    if generation is not None and _generation(generation) != _generation(model.generation_config):
        keys.append("generation_config.json")
    if keys:
        LOG.warning(
            "expo search: θ₀ (%s) and θ_T (%s) differ in %s; the search generates with θ_T's "
            "files, while mergekit-yaml copies θ₀'s into the merged model",
            search.reference, search.final, keys,
        )


def _generation(config) -> dict:
    ignored = {"transformers_version", "_from_model_config"}
    return {k: v for k, v in config.to_diff_dict().items() if k not in ignored}


def resident_bytes(targets: list[_Target]) -> int:
    """Device memory the inputs take when resident: θ₀, θ_T and the intermediates in the merge's
    dtype, or their float64 sum where that is smaller."""
    total = 0
    for target in targets:
        size = target.final.numel() * target.dtype.itemsize
        if not target.floating:
            total += size
            continue
        mids = len(target.intermediates) * size
        mean = target.final.numel() * torch.float64.itemsize if target.intermediates else 0
        total += 2 * size + min(mids, mean)
    return total


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (host: MemAvailable), or None where torch cannot tell."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _make_resident(target: _Target, device: torch.device) -> None:
    """Copy one tensor's inputs onto ``device`` in the merge's dtype (θ̄ as their exact float64
    sum if that is smaller than the intermediates)."""
    dtype = target.dtype

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=device, dtype=dtype, copy=True)

    target.final = moved(target.final)
    if not target.floating:
        return
    target.reference = moved(target.reference)
    mids = target.intermediates
    total = None
    if len(mids) * dtype.itemsize > torch.float64.itemsize:
        total = _exact_sum64([t.to(dtype) for t in mids])  # the kernel sees the cast inputs
    if total is not None:
        target.intermediates, target.summed = (total.to(device),), len(mids)
    else:
        target.intermediates = tuple(moved(t) for t in mids)


def _exact_sum64(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """Σ tensors in float64 if every addition is exact (TwoSum's error is 0), else ``None``:
    the kernel divides it by their number, so θ̄ and the result are those of the merge."""
    total = tensors[0].to(torch.float64, copy=True)
    for tensor in tensors[1:]:
        value = tensor.to(torch.float64)
        new = total + value
        back = new - value
        if bool(((total - back) + (value - (new - back)) != 0).any()):
            return None
        total = new
    return total


def _sample(names, count: int = 4) -> str:
    names = list(names)
    more = f" … ({len(names)} in all)" if len(names) > count else ""
    return ", ".join(names[:count]) + more
