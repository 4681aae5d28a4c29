"""The model-card section that says which model played which role, with which α and λ."""

from __future__ import annotations

from typing import Any

import yaml

from mergekit_expo import METHOD_NAME
from mergekit_expo.parameters import DEFAULT_ALPHA, DEFAULT_LAMBDA
from mergekit_expo.roles import pick_final

SECTION_TITLE = "### Extrapolation roles (mergekit-expo)"


def slice_roles(config: Any) -> list[dict[str, Any]]:
    """Role assignment per output slice, for ``models:``, ``slices:`` or ``modules:`` configs.

    Works before and after mergekit's planner has normalised ``models:`` into slices.
    """
    found = []

    def add(label: str, sources: list[tuple[Any, dict | None]], base: Any, params: dict) -> None:
        non_base = [(model, p) for model, p in sources if model != base]
        if base is None or not non_base:
            return
        marked = [m for m, p in non_base if (p or {}).get("final") is True]
        final = pick_final([m for m, _ in non_base], marked)
        found.append(
            {
                "where": label,
                "reference": str(base),
                "final": str(final),
                "intermediates": [str(m) for m, _ in non_base if m != final],
                "alpha": params.get("alpha", DEFAULT_ALPHA),
                "lambda": params.get("lambda", DEFAULT_LAMBDA),
            }
        )

    shared = config.parameters or {}
    if config.models:
        add(
            "all layers",
            [(m.model, m.parameters) for m in config.models],
            config.base_model,
            shared,
        )
    for index, piece in enumerate(config.slices or []):
        _add_slice(add, f"slice {index}", piece, config.base_model, shared)
    for module_name, module in (config.modules or {}).items():
        params = {**shared, **(module.parameters or {})}
        if module.models:
            add(
                module_name,
                [(m.model, m.parameters) for m in module.models],
                config.base_model,
                params,
            )
        for index, piece in enumerate(module.slices or []):
            _add_slice(add, f"{module_name} slice {index}", piece, config.base_model, params)
    return found


def _add_slice(add, label: str, piece: Any, base: Any, params: dict) -> None:
    sources = [(s.model, s.parameters) for s in piece.sources]
    layers = {tuple(s.layer_range) for s in piece.sources}
    label = (
        f"{label}, layers {sorted(layers)}"
        if len(layers) > 1
        else f"{label}, layers {layers.pop()}"
    )
    add(label, sources, piece.base_model or base, {**params, **(piece.parameters or {})})


def add_roles_section(card_text: str, config: Any) -> str:
    if config.merge_method != METHOD_NAME:
        return card_text
    lines = [
        "",
        SECTION_TITLE,
        "",
        "θ = −αθ₀ + (1+α)λθ̄ + (1+α)(1−λ)θ_T; with λ = 0 this is ExPO, θ_T + α(θ_T − θ₀).",
        "",
    ]
    for roles in slice_roles(config):
        lines += [
            f"- {roles['where']}:",
            f"  - reference θ₀ (base_model): {roles['reference']}",
            f"  - final θ_T: {roles['final']}",
            f"  - intermediates averaged into θ̄: {roles['intermediates'] or 'none'}",
            f"  - alpha: {_setting(roles['alpha'])}",
            f"  - lambda: {_setting(roles['lambda'])}",
        ]
    return card_text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def _setting(value: Any) -> str:
    """Render a scalar, gradient or filter list as one line of YAML."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_none=True)
    elif isinstance(value, list):
        value = [v.model_dump(exclude_none=True) if hasattr(v, "model_dump") else v for v in value]
    if isinstance(value, (int, float, str)):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
