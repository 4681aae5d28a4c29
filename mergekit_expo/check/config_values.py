"""Mistakes in an expo config's parameters, found from the config alone.

mergekit passes every key under ``parameters:`` through without a word, so ``alhpa: 0.5``,
``lamda: 0.3``, ``alpha`` under one model's ``parameters:`` (shared parameters are read only
from the global, module and slice scopes) all leave the default α = 0.3 in force. Refused here,
naming the key, where it is and what to write instead; so are the config-level problems the plan
itself cannot get past (``final`` not a boolean or on two models, dtype names mergekit does not
read, λ without intermediates).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

from mergekit_expo.check.findings import Finding, errors
from mergekit_expo.merge.parameters import PER_MODEL, SHARED
from mergekit_expo.plan.build import config_problems
from mergekit_expo.plan.scopes import scopes, setting_values

KNOWN = SHARED + PER_MODEL
FILTER_EXAMPLE = "alpha: [{filter: mlp, value: 0.5}, {value: 0.3}]"


def config_findings(config: Any) -> list[Finding]:
    """Unknown keys, shared parameters given per model, ``final`` misplaced or not a boolean,
    dtype names, roles; negative α as a note."""
    findings = []
    for scope in scopes(config):
        for key in scope.parameters or {}:
            message = _key_problem(str(key), scope.where, scope.model, scope.base)
            if message:
                findings.append(Finding("error", message))
    findings += errors(config_problems(config))
    negative = sorted({value for key, value in _numbers(config) if key == "alpha" and value < 0})
    if negative:
        findings.append(
            Finding(
                "info",
                f"expo: alpha = {', '.join(f'{v:g}' for v in negative)} is negative: the merge "
                "interpolates back toward θ₀ (between θ₀ and θ_T) instead of extrapolating "
                "beyond θ_T.",
            )
        )
    return findings


def _key_problem(key: str, where: str, model: Any, base: Any) -> str | None:
    if model is None:
        if key in SHARED:
            return None
        if key == "final":
            return (
                f"expo: `final` in {where} would mark every model as θ_T: put `final: true` "
                "under the parameters of the one model that is θ_T (e.g. "
                "models[1].parameters), or leave it out to use the last model listed."
            )
        return _unknown(key, where, SHARED)
    if key == "final":
        if model == base:
            return (
                f"expo: `final` in {where} is set on the base model {model}, which is θ₀ (the "
                "reference); mark the aligned model θ_T instead."
            )
        return None
    if key in SHARED:
        owner = f"the base model {model}" if model == base else f"model {model}"
        return (
            f"expo: `{key}` in {where} (under {owner}) is ignored by mergekit: `{key}` is one "
            f"value per tensor, shared by all models, so the default would be used. Write it "
            f"under the top-level `parameters:` (e.g. `{key}: 0.5`), or for some tensors only "
            f"with a filter, e.g. `{FILTER_EXAMPLE.replace('alpha', key)}`. Only `final` "
            "belongs under a model's own parameters."
        )
    return _unknown(key, where, PER_MODEL)


def _unknown(key: str, where: str, allowed: tuple[str, ...]) -> str:
    match = difflib.get_close_matches(key.lower(), KNOWN, n=1, cutoff=0.6)
    hint = f"; did you mean `{match[0]}`?" if match else ""
    names = ", ".join(f"`{name}`" for name in allowed)
    return f"expo: unknown parameter `{key}` in {where}{hint} (expo reads {names} there)"


def _numbers(config: Any) -> Iterator[tuple[str, float]]:
    for scope in scopes(config):
        for key, value in (scope.parameters or {}).items():
            for scalar, _ in setting_values(value):
                if isinstance(scalar, (int, float)) and not isinstance(scalar, bool):
                    yield key, float(scalar)


def filters(config: Any) -> list[tuple[str, str, str]]:
    """(where, key, filter string) of every conditional parameter value."""
    found = []
    for scope in scopes(config):
        for key, value in (scope.parameters or {}).items():
            for _, text in setting_values(value):
                if text is not None and text != "*" and (scope.where, key, text) not in found:
                    found.append((scope.where, key, text))
    return found
