"""One reading of an ``expo`` config: the plan every surface uses.

``build.plan_config`` turns a config into its roles, α/λ settings and dtypes per output slice;
``build.build_plan`` adds every tensor mergekit's own planner would write, with the α and λ
mergekit resolves for it, its roles, working and output dtypes and size. The merge (through
``patches``), the model card, ``mergekit-expo check`` and ``mergekit-expo search`` all read a
config through here; nothing else parses one.

- ``config``: a config from a path, a mapping or a ``MergeConfiguration``; top-level keys;
- ``scopes``: the one walk over models, slices and modules;
- ``dtypes``: dtype names and mergekit's promotion rule, in one place;
- ``headers``: safetensors headers (names, dtypes, shapes, complete files);
- ``tasks``: mergekit's planner on a copy of the config, and what its tasks carry;
- ``types``: the immutable plan; ``build``: how it is made.
"""
