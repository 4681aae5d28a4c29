"""``merge_method: expo``: the kernel, its spec, and what joins it to the unmodified mergekit.

- ``method``: the kernel and its ``MergeMethodSpec`` (the papers' equations);
- ``formula``: the extrapolation on plain tensors, float64 and one rounding (also used by the
  search);
- ``roles``: the one rule for who is θ₀, θ_T and an intermediate (per tensor, per config slice);
- ``parameters``: the YAML parameters, their defaults and validation;
- ``guards``: non-finite refusals, the relatedness warning, vocabulary rows θ₀ lacks;
- ``card``: the model-card section; ``hooks``: registration and the mergekit extensions;
- ``output``: the output folder, staged and moved into place only when complete;
- ``validation``, ``headers``, ``forecast``: mistakes found before any tensor is read (config,
  input files, what the output will be), at every merge's start and by ``mergekit-expo check``.

This ``__init__`` is imported at interpreter start-up (for :data:`METHOD_NAME`), so it imports
nothing: torch and mergekit come in with the submodules.
"""

METHOD_NAME = "expo"
