"""Candidates of an adapter-based search: only the LoRA scalings change, no weight is rewritten.

For a config whose models are ``BASE+ADAPTER`` (mergekit's LoRA syntax) the candidate
θ(α, λ) − BASE = −α·U₀ + (1+α)λ·mean(U₁…U_{T−1}) + (1+α)(1−λ)·U_T is a weighted sum of the
adapters' updates Uᵢ = sᵢBᵢAᵢ (U₀: the reference adapter when θ₀ is itself BASE+ADAPTER). All
adapters are loaded once into one PEFT model, all active, and a candidate sets each LoRA layer's
``scaling[adapter]`` to coefficient × sᵢ. ``modules_to_save`` (full tensors) are the exception:
their tensor is rewritten per candidate with the merge method's float64 formula, which needs a
single adapter. Same interface as :class:`mergekit_expo.search.candidates.CandidateWeights`.
"""

from __future__ import annotations

import logging

import torch

from mergekit_expo.lora.adapter import AdapterError, read_adapter
from mergekit_expo.merge.formula import extrapolate
from mergekit_expo.search.generation import progress_bars_as_asked
from mergekit_expo.search.merge_config import SearchConfig, SearchConfigError

LOG = logging.getLogger("mergekit_expo")


class AdapterWeights:
    """BASE plus every adapter of the config, held once; :meth:`apply` sets the scalings."""

    @progress_bars_as_asked  # progress=False: transformers' bars off while loading, then as before
    def __init__(self, search: SearchConfig, *, device: str = "cpu",
                 need_intermediates: bool = False, progress: bool = True):
        from mergekit.common import dtype_from_name
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.search = search
        roles = [("final", search.final)]
        if need_intermediates:
            roles += [(f"intermediate{i}", m) for i, m in enumerate(search.intermediates)]
        if search.reference.lora is not None:
            roles.append(("reference", search.reference))
        adapters = {}
        for name, model in roles:
            try:
                adapters[name] = read_adapter(model.lora.path)
            except AdapterError as error:
                raise SearchConfigError(f"{search.path}: {error}") from None
        saved = {n for a in adapters.values() for n in a.saved}
        if saved and len(adapters) > 1:
            raise SearchConfigError(
                f"{search.path}: adapter(s) save full tensors ({', '.join(sorted(saved))}); the "
                "adapter search rewrites those for a single adapter only (no intermediates, no "
                "reference adapter). Merge the adapters into full checkpoints for this search."
            )
        dtype = dtype_from_name(search.out_dtype or search.input_dtype)
        base = search.final.model.path
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto")
        first, *rest = adapters
        model = PeftModel.from_pretrained(model, str(roles[0][1].lora.path), adapter_name=first)
        for name in rest:
            model.load_adapter(str(dict(roles)[name].lora.path), adapter_name=name)
        model.base_model.set_adapter(list(adapters))
        self.model = model.to(device).eval()
        self.adapters = adapters
        self.layers = _lora_layers(model, list(adapters))
        self.saved = self._bind_saved(adapters.get("final"), base)
        self.applied: tuple[float, float] | None = None

    def _bind_saved(self, final, base) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(the model's tensor, θ₀'s, θ₁'s) for each modules_to_save tensor of the adapter."""
        from mergekit_expo.lora.adapter import read_base_tensors

        if final is None or not final.saved:
            return []
        theta0 = read_base_tensors(base, list(final.saved))
        state = self.model.state_dict(keep_vars=True)
        bound = []
        for name, key in final.saved.items():
            module, _, leaf = name.rpartition(".")
            target = f"base_model.model.{module}.modules_to_save.final.{leaf}"
            if ".base_layer." in key:
                target = f"base_model.model.{module}.base_layer.{leaf}"
            if target not in state:
                raise SearchConfigError(f"{self.search.path}: cannot find {name} in the model")
            bound.append((state[target], theta0[name], final.tensors[key]))
        return bound

    def coefficients(self, alpha: float, lam: float) -> dict[str, float]:
        """Each adapter's factor on its own update, as in the merge's formula."""
        mids = [n for n in self.adapters if n.startswith("intermediate")]
        factors = {"final": (1 + alpha) * (1 - lam), "reference": -alpha}
        factors.update({name: (1 + alpha) * lam / len(mids) for name in mids})
        return {name: factors[name] for name in self.adapters}

    @torch.no_grad()
    def apply(self, alpha: float, lam: float) -> None:
        """The model becomes θ(α, λ): scalings set, modules_to_save recomputed."""
        if lam and not any(n.startswith("intermediate") for n in self.adapters):
            raise SearchConfigError(
                f"lambda = {lam:g} needs intermediate adapters: list them under `models:` "
                "before the final one, or search lambda 0 only"
            )
        factors = self.coefficients(alpha, lam)
        for layer, name, scaling in self.layers:
            layer.scaling[name] = factors[name] * scaling
        for parameter, theta0, theta1 in self.saved:
            extrapolate(theta0, theta1, alpha=alpha, out=parameter.data)
        self.applied = (alpha, lam)

    @torch.no_grad()
    def apply_reference(self) -> None:
        """θ₀ (the DPO reference policy): α = −1 removes the step exactly."""
        self.apply(-1.0, 0.0)
        self.applied = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The candidate merged into plain tensors by checkpoint name (for checks; a copy)."""
        import copy

        merged = copy.deepcopy(self.model).merge_and_unload()
        return {k: v.detach() for k, v in merged.state_dict().items()}


def _lora_layers(model, names: list[str]) -> list[tuple[object, str, float]]:
    """(layer, adapter, the scaling PEFT computed from the config) for every LoRA layer."""
    from peft.tuners.lora import LoraLayer

    found = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in names:
                if name in module.scaling:
                    found.append((module, name, module.scaling[name]))
    return found
