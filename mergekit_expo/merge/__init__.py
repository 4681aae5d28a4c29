"""``merge_method: expo``: the kernel and what it needs from mergekit's public API.

- ``method``: the kernel and its ``MergeMethodSpec`` (the papers' equations);
- ``formula``: the extrapolation on plain tensors, float64 and one rounding (also used by the
  search and the LoRA path);
- ``roles``: the one rule for who is θ₀, θ_T and an intermediate (per tensor; the plan uses it);
- ``parameters``: the parameter names, their defaults and validation;
- ``guards``: non-finite refusals, the relatedness warning, vocabulary rows θ₀ lacks.

How ``expo`` joins mergekit is in ``mergekit_expo.patches``; how a config is read, in
``mergekit_expo.plan``; what is checked before a merge, in ``mergekit_expo.check``.

This ``__init__`` is imported at interpreter start-up (for :data:`METHOD_NAME`), so it imports
nothing: torch and mergekit come in with the submodules.
"""

METHOD_NAME = "expo"
