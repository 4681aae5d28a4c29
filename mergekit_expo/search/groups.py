"""Named groups of tensors, each with its own α (and λ), and their mergekit filter lists.

A group is a list of mergekit-style ``filter`` substrings and/or a set of layer indices. A tensor
belongs to the first group (in order) that matches it, which is mergekit's own rule for a
parameter given as a filter list (``evaluate_setting``: substring test, first match wins);
tensors no group matches form the group ``other``. The winner's values are written back as
filter lists, and every tensor of the model is resolved through mergekit's ``evaluate_setting``
against that list before it is written, so ``best.yml`` gives each tensor exactly the α and λ it
was scored with. Layer bands are written as one filter per layer (``model.layers.3.``): exact
for every tensor, where a layer gradient would interpolate (and round) α between its ends.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergekit_expo.search.merge_config import SearchConfig, SearchConfigError, best_config

LOG = logging.getLogger("mergekit_expo")

OTHER = "other"
# ``model.layers.12.`` / ``transformer.h.3.`` / ``blocks.0.``: the layer prefix of a tensor name
LAYER = re.compile(r"^(?:.*?\.)?(?:layers|h|blocks|block|layer)\.(\d+)\.")

# Module presets, tried in this order (first match wins, as in mergekit): norms first, so that
# ``post_attention_layernorm`` is a norm and not attention.
PRESETS: dict[str, tuple[str, ...]] = {
    "norms": ("norm", "ln_"),
    "attention": ("self_attn.", "attn.", "attention."),
    "mlp": ("mlp.", "feed_forward.", "ffn."),
    "embeddings_head": ("embed", "lm_head", "wte.", "wpe."),
}
PRESET_SETS = {"modules": tuple(PRESETS)}


@dataclass(frozen=True)
class Group:
    """Tensors whose name contains one of ``filters`` (any, if empty) and, if ``layers`` is
    set, whose layer index is one of them (non-layer tensors never match then)."""

    name: str
    filters: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None

    def matches(self, tensor: str) -> bool:
        if self.filters and not any(f == "*" or f in tensor for f in self.filters):
            return False  # mergekit's rule: substring, and "*" matches every tensor
        if self.layers is None:
            return True
        index = layer_index(tensor)
        return index is not None and index in self.layers

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "filters": list(self.filters),
                "layers": None if self.layers is None else list(self.layers)}


def layer_index(tensor: str) -> int | None:
    found = LAYER.match(tensor)
    return int(found.group(1)) if found else None


def parse_group(text: str) -> list[Group]:
    """``modules`` (the four presets), one preset name, or ``NAME=FILTER[+FILTER...]``."""
    text = text.strip()
    if text in PRESET_SETS:
        return [Group(name, PRESETS[name]) for name in PRESET_SETS[text]]
    if text in PRESETS:
        return [Group(text, PRESETS[text])]
    name, sep, filters = text.partition("=")
    parts = tuple(f for f in filters.split("+") if f)
    if not sep or not name or not parts:
        raise ValueError(
            f"group {text!r}: write a preset ({', '.join([*PRESET_SETS, *PRESETS])}) or "
            "NAME=FILTER[+FILTER...], e.g. attn=self_attn.+attention. (mergekit filters: a "
            "tensor belongs to the first group with a filter that is a substring of its name)"
        )
    if name == OTHER:
        raise ValueError(f"group name {OTHER!r} is reserved for tensors no group matches")
    return [Group(name, parts)]


def layer_bands(layers: int, bands: int) -> list[tuple[int, ...]]:
    """``bands`` contiguous runs of layer indices, as equal as possible (earlier ones longer)."""
    if not 1 <= bands <= layers:
        raise SearchConfigError(f"--layer-bands {bands}: the model has {layers} layers")
    size, extra = divmod(layers, bands)
    out, start = [], 0
    for band in range(bands):
        stop = start + size + (band < extra)
        out.append(tuple(range(start, stop)))
        start = stop
    return out


def build_groups(specs: Sequence[str], bands: int | None, layers: int) -> list[Group]:
    """The groups of a run: module groups, layer bands, or each module group split by band
    (then non-layer tensors of a module group, e.g. the final norm, keep one group)."""
    modules = [g for spec in specs for g in parse_group(spec)]
    names = [g.name for g in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"group names must be unique, got {names}")
    if not bands:
        return modules
    runs = layer_bands(layers, bands)
    if not modules:
        return [Group(f"layers_{r[0]}-{r[-1]}", (), r) for r in runs]
    banded = [Group(f"{g.name}.layers_{r[0]}-{r[-1]}", g.filters, r) for g in modules for r in runs]
    return banded + modules


def assign(groups: Sequence[Group], tensors: Iterable[str]) -> dict[str, str]:
    """Tensor name → group name (first match; ``other`` if none), with mergekit's own resolver
    where the groups are plain filter lists."""
    out = {}
    for tensor in tensors:
        found = next((g.name for g in groups if g.matches(tensor)), OTHER)
        out[tensor] = found
    return out


# -- mergekit filter lists -----------------------------------------------------------------


def render(
    groups: Sequence[Group], assignment: Mapping[str, str], values: Mapping[str, float]
) -> list[dict[str, Any]]:
    """A mergekit parameter (filter list) that gives every tensor its group's value.

    Filter-only groups are written with their own filters, in order. Groups with layers are
    written with the shortest name prefixes (``model.layers.3.``, ``model.layers.3.mlp.``) that
    only their own tensors contain. The result is checked tensor by tensor with mergekit's
    resolver; a list that would give any tensor another value is refused.
    """
    used = [g for g in groups if g.name in set(assignment.values())]
    if all(g.layers is None for g in used):
        # only filters that match a tensor of their group: mergekit's merge refuses a filter
        # that matches no tensor (check.tensors), and one that matches none decides nothing
        entries = [
            {"filter": f, "value": values[g.name]} for g in used for f in g.filters
            if any(f == "*" or f in t for t, name in assignment.items() if name == g.name)
        ]
    else:
        entries = []
        for group in used:
            members = [t for t, g in assignment.items() if g == group.name]
            filters = dict.fromkeys(_prefix(t, assignment) for t in members)
            entries += [{"filter": f, "value": values[group.name]} for f in filters]
    if OTHER in set(assignment.values()):
        entries.append({"value": values[OTHER]})
    check(entries, assignment, values)
    return entries


def _prefix(tensor: str, assignment: Mapping[str, str]) -> str:
    """The shortest prefix of ``tensor`` (cut after a dot) that no tensor of another group
    contains; the whole name if every shorter prefix is shared."""
    group = assignment[tensor]
    cuts = [i + 1 for i, c in enumerate(tensor) if c == "."] + [len(tensor)]
    for cut in cuts:
        candidate = tensor[:cut]
        if all(g == group for t, g in assignment.items() if candidate in t):
            return candidate
    raise SearchConfigError(
        f"tensor {tensor} cannot be given its own α by a mergekit filter: its full name is "
        "part of a tensor name in another group; put both in one group"
    )


def check(entries: list[dict[str, Any]], assignment: Mapping[str, str], values) -> None:
    """Resolve every tensor through mergekit's ``evaluate_setting``; refuse any mismatch."""
    from mergekit.config import ConditionalParameter, evaluate_setting

    setting = [ConditionalParameter(**e) for e in entries]
    for tensor, group in assignment.items():
        got = evaluate_setting(tensor, setting, 0.0, validate=lambda v: v)
        if got != values[group]:
            raise SearchConfigError(
                f"the filter list for group {group!r} gives tensor {tensor} the value {got!r} "
                f"instead of {values[group]!r}; choose filters that separate the groups"
            )


def grouped_config(
    search: SearchConfig,
    groups: Sequence[Group],
    assignment: Mapping[str, str],
    values: Mapping[str, Sequence[float]],
    *,
    with_lambda: bool,
) -> dict[str, Any]:
    """``best.yml`` for a per-group winner: the user's config with alpha (and lambda) as
    mergekit filter lists."""
    config = best_config(search, 0.0, 0.0)
    alphas = {name: float(v[0]) for name, v in values.items()}
    config["parameters"]["alpha"] = render(groups, assignment, alphas)
    if with_lambda:
        lambdas = {name: float(v[1]) for name, v in values.items()}
        config["parameters"]["lambda"] = render(groups, assignment, lambdas)
    return config


def groups_of(settings, search: SearchConfig) -> tuple[list[Group], dict[str, str]]:
    """The run's groups and every checkpoint tensor's group (one group ``all`` if none)."""
    if search.uses_adapters:  # one scale per adapter: no tensors to group
        if settings.groups or settings.layer_bands or settings.trials:
            raise SearchConfigError(
                f"{search.path}: per-group α (--groups, --layer-bands, --trials) needs full "
                "checkpoints; an adapter search sets one α for the whole adapter. Merge the "
                "adapters into checkpoints (model: BASE+ADAPTER with mergekit) to search groups"
            )
        return [], {"*": "all"}
    loader = search.final.lazy_loader(lazy_unpickle=False)
    names = list(loader.index.tensor_paths)
    if not settings.groups and not settings.layer_bands:
        return [], dict.fromkeys(names, "all")
    layers = getattr(search.final.config(), "num_hidden_layers", None) or 0
    groups = build_groups(settings.groups, settings.layer_bands, layers)
    assignment = assign(groups, names)
    used = set(assignment.values())
    LOG.info("expo search: groups %s", {g: sum(v == g for v in assignment.values())
                                         for g in [*(g.name for g in groups), OTHER] if g in used})
    if settings.trials and len(used) < 2:
        raise SearchConfigError(
            f"the groups {[g.name for g in groups]} put every tensor of {search.final} into one "
            "group; per-group trials need at least two (check the filters against the tensor "
            f"names, e.g. {names[:3]})"
        )
    return groups, assignment


def winner_config(search, winner, groups, assignment) -> dict[str, Any]:
    if winner.get("groups") is None:
        return best_config(search, winner["alpha"], winner["lambda"])
    values = winner["groups"]
    lambdas = {v[1] for v in values.values()}
    config = grouped_config(search, groups, assignment, values, with_lambda=len(lambdas) > 1)
    if len(lambdas) == 1 and (lambdas != {0.0} or "lambda" in config["parameters"]):
        config["parameters"]["lambda"] = lambdas.pop()
    return config
