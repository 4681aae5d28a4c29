"""The model-card section that says which model played which role, with which α and λ."""

from __future__ import annotations

from typing import Any

import yaml

from mergekit_expo.merge import METHOD_NAME
from mergekit_expo.merge.roles import slice_roles

SECTION_TITLE = "### Extrapolation roles (mergekit-expo)"


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
