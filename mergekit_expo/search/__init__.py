"""``mergekit-expo search``: choose α (and λ) the way the papers do, without a model per candidate.

- ``settings``: what a run was asked to do (grid, scorer, sampling), validated;
- ``merge_config``: the merge YAML as the search reads it (roles from ``merge.roles``);
- ``candidates``: one model in memory whose weights become each candidate, with the merge's kernel;
- ``generation``, ``prompts``, ``scorers``: sampling answers and scoring them;
- ``results``, ``plot``: results.jsonl (resumable) and the PNG;
- ``run``: the loop, the winner, ``best.yml`` and ``--write-best``.

Dependencies run one way: search → merge → (mergekit, torch); nothing in ``merge`` imports this.
"""
