"""The candidate model behind a narrow interface: set (α, λ) per group, get a model to score.

:class:`GroupedWeights` remembers which (α, λ) each group's tensors hold and rewrites only the
groups whose values change, so a trial that moves one group's α costs one group's arithmetic.
Another way of building candidates (another backend) only needs ``set``, ``apply_reference``
and ``model``.
"""

from __future__ import annotations

from collections.abc import Mapping

from mergekit_expo.search.candidates import CandidateWeights

Values = Mapping[str, tuple[float, float]]  # group name → (α, λ)


class GroupedWeights:
    """A :class:`CandidateWeights` whose tensors are split into named groups."""

    def __init__(self, weights: CandidateWeights, assignment: Mapping[str, str]):
        self.weights = weights
        self.members: dict[str, frozenset[str]] = {}
        for target in weights.targets:
            group = assignment[target.name]
            self.members[group] = self.members.get(group, frozenset()) | {target.name}
        self.held: dict[str, tuple[float, float] | None] = dict.fromkeys(self.members)

    @property
    def model(self):
        return self.weights.model

    @property
    def groups(self) -> list[str]:
        return list(self.members)


    def uniform(self, alpha: float, lam: float) -> dict[str, tuple[float, float]]:
        return dict.fromkeys(self.members, (float(alpha), float(lam)))

    def set(self, values: Values) -> int:
        """Make the model θ(α_g, λ_g) for every group g; returns the groups rewritten."""
        missing = set(self.members) - set(values)
        if missing:
            raise KeyError(f"no (α, λ) given for groups {sorted(missing)}")
        changed = 0
        for group, names in self.members.items():
            alpha, lam = (float(v) for v in values[group])
            if self.held[group] == (alpha, lam):
                continue
            self.held[group] = None  # half-written if the next line raises
            self.weights.apply(alpha, lam, only=names)
            self.held[group] = (alpha, lam)
            changed += 1
        return changed

    def apply_reference(self) -> None:
        """θ₀ in every tensor (the DPO scorer's reference policy)."""
        self.weights.apply_reference()
        self.held = dict.fromkeys(self.members)


class UniformWeights:
    """A backend with one (α, λ) for the whole model (the LoRA scalings of an adapter search):
    every group must get the same values."""

    def __init__(self, weights):
        self.weights = weights
        self.held: tuple[float, float] | None = None

    @property
    def model(self):
        return self.weights.model

    def set(self, values: Values) -> int:
        distinct = {tuple(float(v) for v in value) for value in values.values()}
        if len(distinct) != 1:
            raise ValueError(f"this backend takes one (α, λ) for all tensors, got {distinct}")
        (alpha, lam), = distinct
        if self.held == (alpha, lam):
            return 0
        self.held = None
        self.weights.apply(alpha, lam)
        self.held = (alpha, lam)
        return 1

    def apply_reference(self) -> None:
        self.held = None
        self.weights.apply_reference()
