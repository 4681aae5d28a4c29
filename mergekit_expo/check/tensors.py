"""Mistakes found once mergekit has planned the merge: which tensors it reads and writes.

A filter that matches no tensor (its value would never be used); a tensor one input lacks or
holds in another shape (the merge would stop halfway); tensors every input holds that the merge
would not write (mergekit's architecture does not cover them: the output would silently lack
them). From the plan and the inputs' headers; no tensor is read.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from mergekit_expo.check.config_values import filters
from mergekit_expo.check.findings import Finding
from mergekit_expo.plan.types import Plan

# Problems of one kind listed in full up to this many; the rest are counted.
SHOWN = 3


def filter_findings(config: Any, tensor_names: Iterable[str]) -> list[Finding]:
    """A filter matches a tensor when it is a substring of its name (mergekit's rule)."""
    names = sorted(set(tensor_names))
    if not names:
        return []
    parts = sorted({part for name in names for part in name.split(".") if not part.isdigit()})
    findings = []
    for where, key, text in filters(config):
        if any(text in name for name in names):
            continue
        match = difflib.get_close_matches(text, parts, n=1, cutoff=0.6)
        hint = f" Did you mean `{match[0]}`?" if match else ""
        findings.append(
            Finding(
                "error",
                f"expo: the filter `{text}` of `{key}` in {where} matches no tensor of this "
                f"merge, so its value would never be used (mergekit applies a filter to every "
                f"tensor whose name contains it; names look like {names[len(names) // 2]})."
                f"{hint}",
            )
        )
    return findings


def missing_findings(plan: Plan) -> list[Finding]:
    """Tensors an input lacks, or holds in another shape than θ_T, where mergekit does not
    align them (vocabulary rows are aligned with ``tokenizer:``)."""
    missing: dict[Any, list[str]] = {}
    shaped: list[str] = []
    for tensor in plan.tensors:
        if tensor.optional:
            continue
        for model in tensor.inputs:
            if model in plan.headers and model not in tensor.shapes:
                missing.setdefault(model, []).append(tensor.name)
        shapes = set(tensor.shapes.values())
        if len(shapes) > 1 and not tensor.vocabulary_aligned:
            described = ", ".join(f"{m}: {tuple(s)}" for m, s in tensor.shapes.items())
            shaped.append(f"{tensor.name} ({described})")
    findings = []
    for model, names in missing.items():
        findings.append(
            Finding(
                "error",
                f"expo: {len(names)} tensors the merge reads are missing from {model} (e.g. "
                f"{', '.join(names[:SHOWN])}): the merge would stop when it reaches them. "
                "Every input must be the same architecture with the same tensor names.",
            )
        )
    if shaped:
        vocabulary = any("embed" in s or "lm_head" in s for s in shaped)
        advice = (
            " The vocabularies differ: add `tokenizer: {source: union}` (or `source: base`) so "
            "that mergekit aligns the rows first." if vocabulary else
            " Every input must have the same shapes."
        )
        findings.append(
            Finding(
                "error",
                f"expo: {len(shaped)} tensors have different shapes in different inputs: "
                f"{'; '.join(shaped[:SHOWN])}.{advice}",
            )
        )
    return findings


def dropped_findings(plan: Plan) -> list[Finding]:
    """Tensors every input holds that the merge would not write."""
    read = set()
    for tensor in plan.tensors:
        for names in tensor.reads.values():
            read.update(names)
    sets = []
    for model in plan.models:
        layout = plan.planned_names.get(model)
        if layout is None:
            continue
        sets.append({n for n, key in layout.items()
                     if key is not None and key not in read and n not in read})
    dropped = sorted(set.intersection(*sets)) if sets else []
    if not dropped:
        return []
    prefixes = sorted({name.split(".")[0] for name in dropped})
    return [
        Finding(
            "error",
            f"expo: {len(dropped)} tensors that every input holds would not be written "
            f"(e.g. {', '.join(dropped[:SHOWN])}; under {', '.join(prefixes)}): mergekit's "
            "architecture for these checkpoints does not cover them, so the output "
            "would silently lack them (for LLaVA-style models, the whole language "
            "model). Merge a checkpoint that holds only the part mergekit knows (e.g. "
            "the language model saved on its own), or give mergekit an architecture "
            "definition that names these tensors.",
        )
    ]


def tensor_findings(plan: Plan) -> list[Finding]:
    """Everything wrong with the planned tensors."""
    names = {t.name for t in plan.tensors}
    for tensor in plan.tensors:
        for reads in tensor.reads.values():
            names.update(reads)
    return filter_findings(plan.config, names) + missing_findings(plan) + dropped_findings(plan)
