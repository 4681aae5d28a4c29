"""One model in memory whose weights become each (α, λ) candidate in place.

θ₀, θ_T (and the intermediates, or their float64 mean θ̄) are read once through mergekit's own
tensor loader, cast exactly as the merge casts them (``dtype:``), and each candidate is written
into the model's parameters with :func:`mergekit_expo.merge.formula.extrapolate` — the kernel of
the merge method — then cast as the merge casts its output (``out_dtype:``). A candidate is
therefore bit-identical to what ``mergekit-yaml`` would write for the same α and λ, without
writing or loading a model.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mergekit_expo.merge.formula import extrapolate, extrapolate_checked
from mergekit_expo.merge.guards import NonFiniteError, overflow_message, relative_change
from mergekit_expo.search.merge_config import SearchConfig, SearchConfigError

LOG = logging.getLogger("mergekit_expo")

# Config keys that legitimately differ between θ₀ and θ_T without changing the network.
CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype"}


class CandidateOverflow(NonFiniteError):
    """This (α, λ) overflows the output dtype; the merge would refuse it too."""


@dataclass
class _Target:
    name: str  # checkpoint tensor name
    parameter: torch.Tensor  # the model's tensor, overwritten in place
    final: torch.Tensor
    reference: torch.Tensor | None = None  # stays None for non-float tensors (merge copies θ_T)
    intermediates: tuple[torch.Tensor, ...] = ()

    @property
    def floating(self) -> bool:
        return self.final.is_floating_point()


class CandidateWeights:
    """Inputs held once; :meth:`apply` turns the model into one candidate, in place."""

    def __init__(
        self,
        search: SearchConfig,
        *,
        device: str = "cpu",
        need_intermediates: bool = False,
        progress: bool = True,
    ):
        from mergekit.common import dtype_from_name

        self.search = search
        if not progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        self.input_dtype = dtype_from_name(search.input_dtype)
        self.out_dtype = dtype_from_name(search.out_dtype)
        loaders = {"final": search.final.lazy_loader(lazy_unpickle=False)}
        final_tensors = {}
        names = list(loaders["final"].index.tensor_paths)
        for name in tqdm(names, desc="Reading θ_T", disable=not progress, leave=False):
            final_tensors[name] = self._cast(loaders["final"].get_tensor(name))
        loaders["final"].flush()
        self.tensor_dtype = _dominant_dtype(final_tensors.values())  # what the kernel sees
        self.model_dtype = self.out_dtype or self.tensor_dtype
        self.model = load_model(search, self.model_dtype, device)
        self.targets = self._bind(final_tensors)
        del final_tensors
        self._read_reference_and_intermediates(need_intermediates, progress)
        self._warn_if_unrelated()
        self.applied: tuple[float, float] | None = None

    # -- reading ---------------------------------------------------------------------------

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.input_dtype is not None and tensor.dtype != self.input_dtype:
            return tensor.to(self.input_dtype)
        return tensor

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
            targets.append(_Target(found, parameter, final))
        return targets

    def _read_reference_and_intermediates(self, need_intermediates: bool, progress: bool) -> None:
        search = self.search
        reference = search.reference.lazy_loader(lazy_unpickle=False)
        models = list(search.intermediates) if need_intermediates else []
        mids = [m.lazy_loader(lazy_unpickle=False) for m in models]
        # keep the intermediates as read unless their float64 mean θ̄ takes less memory
        keep_list = len(mids) * self.tensor_dtype.itemsize <= torch.float64.itemsize
        for target in tqdm(self.targets, desc="Reading θ₀, θ̄", disable=not progress, leave=False):
            if not target.floating:
                continue
            target.reference = self._read(reference, search.reference, target)
            loaded = [
                self._read(loader, model, target)
                for loader, model in zip(mids, models, strict=True)
            ]
            target.intermediates = tuple(loaded) if keep_list or not loaded else (_mean64(loaded),)
        for loader in (reference, *mids):
            loader.flush()

    def _read(self, loader, model, target: _Target) -> torch.Tensor:
        name = target.name
        if name not in loader.index.tensor_paths:
            raise SearchConfigError(
                f"tensor {name} of the final model {self.search.final} is missing from {model}; "
                "the search needs every model to have the same tensor names and shapes"
            )
        tensor = self._cast(loader.get_tensor(name))
        if tuple(tensor.shape) != tuple(target.final.shape):
            raise SearchConfigError(
                f"tensor {name}: shape {tuple(tensor.shape)} in {model} differs from "
                f"{tuple(target.final.shape)} in the final model {self.search.final}; the "
                "search needs identical shapes (no vocabulary union)"
            )
        return tensor

    def _warn_if_unrelated(self) -> None:
        threshold = self.search.warn_relative_change
        for target in self.targets:
            if target.reference is None:
                continue
            pairs = [(self.search.final, target.final)]
            if len(target.intermediates) == len(self.search.intermediates):  # not averaged
                pairs += list(zip(self.search.intermediates, target.intermediates, strict=True))
            for model, tensor in pairs:
                change = relative_change(tensor, target.reference)
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
        for target in self.targets:
            if only is not None and target.name not in only:
                continue
            parameter = target.parameter.data
            if not target.floating:
                parameter.copy_(target.final)
                continue
            merge_dtype = target.final.dtype
            written = self.out_dtype or merge_dtype
            if parameter.dtype == written == merge_dtype and parameter.device.type == "cpu":
                _, finite = extrapolate_checked(
                    target.reference, target.final, target.intermediates,
                    alpha=alpha, lam=lam, out=parameter,
                )
            else:  # round as mergekit does: to the input dtype, then to out_dtype
                result = extrapolate(
                    target.reference, target.final, target.intermediates, alpha=alpha, lam=lam
                ).to(written)
                parameter.copy_(result)
                finite = bool(torch.isfinite(result).all())
            if not finite:
                self.applied = None
                self._raise_if_inputs_not_finite(target, lam)
                raise CandidateOverflow(overflow_message(target.name, written, alpha, lam))
        self.applied = (alpha, lam) if only is None else None

    def _raise_if_inputs_not_finite(self, target: _Target, lam: float) -> None:
        """A damaged checkpoint, not this α, when an input itself holds inf/NaN (checked lazily:
        a full pass over every input up front would cost more than a candidate)."""
        search = self.search
        inputs = [(search.reference, target.reference), (search.final, target.final)]
        if not lam:
            pass  # the intermediates took no part
        elif len(target.intermediates) == len(search.intermediates):
            inputs += list(zip(search.intermediates, target.intermediates, strict=True))
        else:  # their float64 mean is non-finite if any of them is
            inputs += [("the intermediate checkpoints", t) for t in target.intermediates]
        for model, tensor in inputs:
            bad = int((~torch.isfinite(tensor)).sum())
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
            target.parameter.data.copy_(source)
        self.applied = None

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


def _dominant_dtype(tensors) -> torch.dtype:
    counts = Counter()
    for tensor in tensors:
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


def _mean64(tensors: list[torch.Tensor]) -> torch.Tensor:
    """θ̄ in float64, summed in the order and way the kernel sums it (so results are identical)."""
    mean = tensors[0].to(torch.float64, copy=True)
    for tensor in tensors[1:]:
        mean.add_(tensor.to(torch.float64))
    return mean.div_(len(tensors))


def _sample(names, count: int = 4) -> str:
    names = list(names)
    more = f" … ({len(names)} in all)" if len(names) > count else ""
    return ", ".join(names[:count]) + more
