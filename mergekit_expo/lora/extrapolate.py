"""ExPO and the iterative (λ, α) merge written as one LoRA adapter, exactly.

A LoRA-trained step is θ₁ = θ₀ + s·BA, so ExPO's θ₂ = θ₁ + α(θ₁ − θ₀) = θ₀ + (1+α)·s·BA. The
factor goes into the scaling, s' = (1+α)·s, through ``lora_alpha`` (and every ``alpha_pattern``
entry): PEFT computes s = lora_alpha / r (rsLoRA: / √r), so multiplying lora_alpha multiplies s
for every module, and not one weight changes. Scaling A and B both would give (1+α)².

Several adapters over the same θ₀ (iterative DPO θᵢ = θ₀ + sᵢBᵢAᵢ, and a reference adapter U₀
when θ₀ is itself base + SFT adapter) combine linearly:

    θ − base = −α·U₀ + (1+α)λ·mean(U₁…U_{T−1}) + (1+α)(1−λ)·U_T

which is one LoRA of the summed rank: the A's concatenated along the rank, each block of B
multiplied by its coefficient and scaling in float64 and rounded once (to float32 or wider), and
scaling 1. ``modules_to_save`` are full tensors and go through the merge method's own float64
formula against θ₀'s tensor. A single DoRA adapter is exact too, with per-row factors on B and
a new magnitude vector computed from θ₀'s weights (``_dora``).
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_expo.lora.adapter import (
    PREFIX,
    Adapter,
    AdapterError,
    read_adapter,
    read_base_tensors,
    write_adapter,
)
from mergekit_expo.lora.base import check_base
from mergekit_expo.lora.card import adapter_card
from mergekit_expo.merge.formula import extrapolate
from mergekit_expo.merge.parameters import DEFAULT_WARN_RELATIVE_CHANGE
from mergekit_expo.output.folder import OutputFolderError, write_problems
from mergekit_expo.output.staging import staged


@dataclass
class Term:
    """One adapter and its coefficient in θ − base."""

    adapter: Adapter
    coefficient: float
    role: str  # reference | intermediate | final


def expo_adapter(
    adapters: list[str | Path], out: str | Path, *, alpha: float, lam: float = 0.0,
    reference_adapter: str | Path | None = None, base: str | Path | None = None,
    ignore_base_name: bool = False, max_relative_change: float = DEFAULT_WARN_RELATIVE_CHANGE,
) -> Path:
    """Write the extrapolated adapter to ``out``.

    ``adapters`` are θ₁…θ_T as adapters (the last is θ_T); ``reference_adapter`` is U₀ when θ₀
    is base + an SFT adapter; ``base`` is the model the adapters are applied to (needed for
    ``modules_to_save``), checked against them (``lora.base``). One adapter and no reference:
    the scaling route (weights untouched); otherwise the rank concatenation. ``out`` gets the
    new adapter's files all at once, its config last, or keeps what it held (``output``).
    """
    if not adapters:
        raise AdapterError("give at least one adapter (θ_T, the DPO adapter)")
    refuse_writing_inputs(out, adapters, reference_adapter, base)
    if not math.isfinite(alpha) or not math.isfinite(lam):
        raise AdapterError(f"alpha and lambda must be finite numbers (got {alpha}, {lam})")
    if lam and len(adapters) < 2:
        raise AdapterError(
            f"lambda = {lam:g} needs the intermediate adapters θ₁…θ_(T−1) before the final one"
        )
    final = read_adapter(adapters[-1], dora=True)
    if len(adapters) > 1 and not lam:
        logging.getLogger("mergekit_expo").warning(
            "expo lora: lambda is 0, so the adapters before the last (%s) are ignored (plain "
            "ExPO on %s); pass --lambda to use them", [str(a) for a in adapters[:-1]], adapters[-1],
        )
    single = reference_adapter is None and not lam
    if not single and final.magnitudes:
        raise AdapterError(
            f"{final.path}: a DoRA adapter cannot be combined with others (its update is not "
            "linear in its scale); merge the full models with mergekit-yaml instead"
        )
    terms = [Term(final, 1 + alpha, "final")] if single else _terms(
        adapters, final, alpha=alpha, lam=lam, reference_adapter=reference_adapter)
    known = {}  # θ₀'s saved-module tensors, read once (by the check, then used)
    if base is not None:
        known = check_base([t.adapter for t in terms], base, ignore_name=ignore_base_name,
                   max_relative_change=max_relative_change)
    with staged(out, "adapter") as stage:
        if not single:
            _concatenated(terms, Path(stage), alpha=alpha, lam=lam, base=base, known=known)
        elif final.magnitudes:
            _dora(final, Path(stage), alpha=alpha, base=base, known=known)
        else:
            _scaled(final, Path(stage), alpha=alpha, base=base, known=known)
    return Path(out)


def refuse_writing_inputs(out, adapters, reference_adapter, base) -> None:
    """Inputs are never written, and one kind of artefact per folder (``output.folder``)."""
    inputs = {("the adapter" if len(adapters) == 1 else f"adapter {path}"): path
              for path in adapters}
    inputs.update({"--reference-adapter": reference_adapter, "--base": base})
    problems = write_problems(
        out, "adapter", {label: path for label, path in inputs.items() if path is not None}
    )
    if problems:
        raise OutputFolderError("\n".join(problems))


# -- one adapter: the scaling ----------------------------------------------------------------


def scaled_config(config: dict, factor: float) -> dict:
    """The adapter config whose every module's scaling is ``factor`` × the input's."""
    new = copy.deepcopy(config)
    new["lora_alpha"] = factor * config["lora_alpha"]
    new["alpha_pattern"] = {k: factor * v for k, v in (config.get("alpha_pattern") or {}).items()}
    return new


def _scaled(final: Adapter, out: Path, *, alpha: float, base, known: dict) -> Path:
    tensors = dict(final.tensors)
    saved = _saved_tensors([Term(final, 1.0, "final")], base, alpha=alpha, lam=0.0, known=known)
    tensors.update(saved)
    config = scaled_config(final.config, 1 + alpha)
    record = _record("scaling", [Term(final, 1 + alpha, "final")], alpha, 0.0, base, config)
    card = adapter_card(record)
    return write_adapter(out, config, tensors, card=card, record=record)


# -- one DoRA adapter: per-row scaled B and a new magnitude ----------------------------------


def _dora(final: Adapter, out: Path, *, alpha: float, base, known: dict) -> Path:
    """θ₂ = (1+α)θ₁ − αW as a DoRA adapter over W = θ₀, exactly (docs/lora.md).

    θ₁ = diag(r)·V with V = W + sBA, r = m / ‖V‖ (per output row). Then
    θ₂ = diag(k)·(W + s·diag(c)·BA) with k = (1+α)r − α and c = (1+α)r / k: the same adapter
    with row i of B times cᵢ and magnitude m' = k·‖W + s·B'A‖. Computed in float64; B' and m'
    are rounded once, to float32 or wider.
    """
    if base is None:
        raise AdapterError(
            f"{final.path} is a DoRA adapter: its magnitude is a norm of θ₀'s rows plus the "
            "update, so θ₀'s weights are needed (--base)"
        )
    names = {module: f"{module}.weight" for module in final.pairs}
    theta0 = read_base_tensors(base, list(names.values()))
    tensors = dict(final.tensors)
    for module, pair in final.pairs.items():
        a = final.tensors[pair.a_key].double()
        b_stored = final.tensors[pair.b_key]
        m_key = final.magnitudes[module]
        dtype = _widest([b_stored.dtype, final.tensors[m_key].dtype, torch.float32])
        w = theta0[names[module]].double()
        rows = w + pair.scaling * (b_stored.double() @ a)
        ratio = final.tensors[m_key].double() / rows.norm(dim=1)
        k = (1 + alpha) * ratio - alpha
        if bool((k == 0).any()):
            raise AdapterError(f"{module}: at alpha = {alpha:g} a row of θ₂ is 0; use another α")
        b_new = ((1 + alpha) * ratio / k)[:, None] * b_stored.double()
        tensors[pair.b_key] = b_new.to(dtype)
        rows_new = w + pair.scaling * (tensors[pair.b_key].double() @ a)
        tensors[m_key] = (k * rows_new.norm(dim=1)).to(dtype)
    tensors.update(
        _saved_tensors([Term(final, 1.0, "final")], base, alpha=alpha, lam=0.0, known=known)
    )
    record = _record("dora", [Term(final, 1 + alpha, "final")], alpha, 0.0, base, final.config)
    return write_adapter(out, final.config, tensors, card=adapter_card(record), record=record)


# -- several adapters: rank concatenation -----------------------------------------------------


def _terms(adapters, final: Adapter, *, alpha, lam, reference_adapter) -> list[Term]:
    terms = []
    if reference_adapter is not None:
        terms.append(Term(read_adapter(reference_adapter), -alpha, "reference"))
    middle = adapters[:-1] if lam else []
    for path in middle:
        terms.append(Term(read_adapter(path), (1 + alpha) * lam / len(middle), "intermediate"))
    terms.append(Term(final, (1 + alpha) * (1 - lam), "final"))
    layouts = {t.adapter.config.get("fan_in_fan_out", False) for t in terms}
    if len(layouts) > 1:
        raise AdapterError("the adapters differ in fan_in_fan_out; they cannot be concatenated")
    bases = {t.adapter.base_model for t in terms}
    if len(bases) > 1:
        logging.getLogger("mergekit_expo").warning(
            "expo lora: the adapters name different base models %s; the combination is exact "
            "only if all were trained over the same model", sorted(map(str, bases)),
        )
    return terms


def _concatenated(terms: list[Term], out: Path, *, alpha, lam, base, known: dict) -> Path:
    dtype = _widest([t.adapter.dtype() for t in terms] + [torch.float32])
    modules = sorted({m for t in terms for m in t.adapter.pairs})
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module in modules:
        blocks = [(t, t.adapter.pairs[module]) for t in terms if module in t.adapter.pairs]
        a_parts, b_parts = [], []
        for term, pair in blocks:
            a, b = term.adapter.tensors[pair.a_key], term.adapter.tensors[pair.b_key]
            mismatch = a_parts and (
                a.shape[1:] != a_parts[0].shape[1:] or b.shape[0] != b_parts[0].shape[0]
            )
            if mismatch:
                raise AdapterError(
                    f"{term.adapter.path}: module {module} has A {tuple(a.shape)}, B "
                    f"{tuple(b.shape)}, unlike the other adapters; they cannot be concatenated"
                )
            a_parts.append(a.to(dtype))
            factor = term.coefficient * pair.scaling
            b_parts.append((b.to(torch.float64) * factor).to(dtype))
        first_term, first = blocks[0]
        tensors[first.a_key] = torch.cat(a_parts, dim=0)
        tensors[first.b_key] = torch.cat(b_parts, dim=1)
        ranks[module] = tensors[first.a_key].shape[0]
    tensors.update(_saved_tensors(terms, base, alpha=alpha, lam=lam, known=known))
    config = _concatenated_config(terms, ranks)
    record = _record("concatenation", terms, alpha, lam, base, config)
    return write_adapter(out, config, tensors, card=adapter_card(record), record=record)


def _concatenated_config(terms: list[Term], ranks: dict[str, int]) -> dict:
    """Scaling 1 for every module: lora_alpha = r per module, plain LoRA (not rsLoRA)."""
    config = copy.deepcopy(terms[-1].adapter.config)
    usual = Counter(ranks.values()).most_common(1)[0][0] if ranks else config["r"]
    others = {re.escape(m): r for m, r in ranks.items() if r != usual}
    saved = sorted({m for t in terms for m in t.adapter.config.get("modules_to_save") or []})
    config.update(
        r=usual, lora_alpha=usual, use_rslora=False, rank_pattern=others,
        alpha_pattern=dict(others), target_modules=sorted(ranks),
        modules_to_save=saved or None, init_lora_weights=True,
        # the module list is explicit: the last adapter's own selectors must not filter it
        layers_to_transform=None, layers_pattern=None, exclude_modules=None,
    )
    return config


# -- modules_to_save: full tensors, the merge method's formula ---------------------------------


def _saved_tensors(terms: list[Term], base, *, alpha: float, lam: float, known: dict):
    """Each saved module's tensor θ = θ₀ + (the formula's combination), float64, one rounding."""
    names = sorted({n for t in terms for n in t.adapter.saved})
    if not names:
        return {}
    lora_modules = {m for t in terms for m in t.adapter.pairs}
    keys = {n: k for t in terms for n, k in t.adapter.saved.items()}
    for name in names:
        if ".base_layer." not in keys[name] and name.rsplit(".", 1)[0] in lora_modules:
            raise AdapterError(
                f"{name} is a full tensor (modules_to_save) in one adapter and a LoRA target in "
                "another: the combination is not one adapter. Merge the full models instead "
                "(mergekit-yaml with `model: BASE+ADAPTER` and merge_method: expo)."
            )
    reference = next((t.adapter for t in terms if t.role == "reference"), None)
    needed = [n for n in names if reference is None or n not in reference.saved]
    if needed and base is None:
        owners = sorted({str(t.adapter.path) for t in terms if set(t.adapter.saved) & set(needed)})
        raise AdapterError(
            f"adapter {', '.join(owners)} saves full tensors (modules_to_save or embedding "
            f"weights: {', '.join(needed)}); they are extrapolated against θ₀'s tensors, so "
            "give the base model θ₀ the adapters were trained over (--base)"
        )
    missing = [name for name in needed if name not in known]
    theta0 = {n: known[n] for n in needed if n in known}
    theta0.update(read_base_tensors(base, missing) if missing else {})
    if reference is not None:
        theta0.update({n: reference.tensors[k] for n, k in reference.saved.items()})
    finals = [t for t in terms if t.role == "final"]
    middles = [t for t in terms if t.role == "intermediate"]
    result = {}
    for name in names:
        start = theta0[name]
        final = _saved_or(finals[0].adapter, name, start)
        mids = [_saved_or(t.adapter, name, start) for t in middles]
        for tensor in (final, *mids):
            if tensor.shape != start.shape:
                raise AdapterError(
                    f"{name}: shape {tuple(tensor.shape)} in an adapter differs from θ₀'s "
                    f"{tuple(start.shape)} ({base}); was the adapter trained over this model?"
                )
        out = torch.empty(start.shape, dtype=final.dtype)
        extrapolate(start, final, mids, alpha=alpha, lam=lam, out=out)
        key = next((t.adapter.saved[name] for t in terms if name in t.adapter.saved), None)
        result[key or PREFIX + name] = out
    return result


def _saved_or(adapter: Adapter, name: str, default: torch.Tensor) -> torch.Tensor:
    key = adapter.saved.get(name)
    return adapter.tensors[key] if key is not None else default


def _widest(dtypes) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).bits)


def _record(route, terms, alpha, lam, base, config) -> dict:
    from importlib.metadata import version

    return {
        "method": "ExPO" if not lam and len(terms) == 1 else "ExPO, iterative (λ, α) merge",
        "route": route,
        "alpha": alpha,
        "lambda": lam,
        "inputs": [
            {"adapter": str(t.adapter.path), "role": t.role, "coefficient": t.coefficient}
            for t in terms
        ],
        "base": str(base) if base is not None else terms[-1].adapter.base_model,
        "lora_alpha": config["lora_alpha"],
        "full_tensors": sorted({n for t in terms for n in t.adapter.saved}),
        "mergekit_expo": version("mergekit-expo"),
    }
