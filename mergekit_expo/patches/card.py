"""``mergekit.card.generate_card``: a model-card section naming which model played which role,
with which α and λ.

The section is rendered from the plan of the config as the user wrote it: mergekit hands
``generate_card`` its planner's rewritten copy (``models:`` turned into slices), so the
``run_merge`` wrapper records the plan of the original for the duration of the merge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType
from typing import Any

import yaml

from mergekit_expo.patches.apply import install_wrapper, rebind_in_merge
from mergekit_expo.patches.record import Call, Internal
from mergekit_expo.plan.build import PlanError, plan_config
from mergekit_expo.plan.config import uses_expo
from mergekit_expo.plan.types import Plan

GENERATE_CARD = Internal(
    "mergekit.card", "generate_card", "the model card's section naming θ₀, θ_T, α and λ is off",
    call=Call(("config", "config_yaml", "name"), forwards=True),
)
RECORDS = (GENERATE_CARD,)
SECTION_TITLE = "### Extrapolation roles (mergekit-expo)"

# The plan of the merge running in this context (set by the run_merge wrapper for its duration).
_merging: ContextVar[Plan | None] = ContextVar("mergekit_expo_card_plan", default=None)


@contextmanager
def merging(config: Any) -> Iterator[None]:
    """Record the plan of ``config`` (as written) while its merge runs."""
    try:
        plan = plan_config(config)  # a copy of the config as written: mergekit rewrites it
    except PlanError:  # refused at the merge's start, with every other finding
        plan = None
    token = _merging.set(plan)
    try:
        yield
    finally:
        _merging.reset(token)


def install(card: ModuleType) -> None:
    function = install_wrapper(card, GENERATE_CARD, _with_roles_section)
    if function is not None:
        rebind_in_merge("generate_card", function)


def _with_roles_section(original: Callable) -> Callable:
    def generate_card(config, config_yaml, name=None, *args, **kwargs):
        text = original(config, config_yaml, name, *args, **kwargs)
        return add_roles_section(text, config)

    return generate_card


def add_roles_section(card_text: str, config: Any) -> str:
    if not uses_expo(config):
        return card_text
    plan = _merging.get() or plan_config(config)
    lines = [
        "",
        SECTION_TITLE,
        "",
        "θ = −αθ₀ + (1+α)λθ̄ + (1+α)(1−λ)θ_T; with λ = 0 this is ExPO, θ_T + α(θ_T − θ₀).",
        "",
    ]
    for piece in plan.slices:
        lines += [
            f"- {piece.where}:",
            f"  - reference θ₀ (base_model): {piece.reference}",
            f"  - final θ_T: {piece.final}",
            f"  - intermediates averaged into θ̄: {[str(m) for m in piece.intermediates] or 'none'}",
            f"  - alpha: {setting_text(piece.alpha)}",
            f"  - lambda: {setting_text(piece.lam)}",
        ]
    return card_text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def setting_text(value: Any) -> str:
    """Render a scalar, gradient or filter list as one line of YAML."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_none=True)
    elif isinstance(value, list):
        value = [v.model_dump(exclude_none=True) if hasattr(v, "model_dump") else v for v in value]
    if isinstance(value, (int, float, str)):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
