"""The search loop's per-group, guard and hold-out parts, kept out of ``run.py``'s grid loop.

``run.py`` calls these with its session (the lazily loaded candidate model, the results file
and the results key); each function here does one step of the extended search.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from mergekit_expo.search.groups import OTHER, Group, assign, build_groups, grouped_config
from mergekit_expo.search.merge_config import SearchConfig, SearchConfigError, best_config
from mergekit_expo.search.results import ResultsFile, settings_key

LOG = logging.getLogger("mergekit_expo")

HOLDOUT_NAME = "holdout.jsonl"


def split_holdout(settings, data: list) -> tuple[list, list | None]:
    """(search data, hold-out data): the ``--holdout-prompts`` file, or a seeded split of
    ``--holdout-fraction`` of the items (seed: the sampling seed), or no hold-out."""
    from mergekit_expo.search.prompts import read_pairs, read_prompts

    if settings.holdout_prompts is not None:
        read = read_pairs if settings.scorer.kind == "dpo" else read_prompts
        return data, read(settings.holdout_prompts)
    if not settings.holdout_fraction:
        return data, None
    order = list(range(len(data)))
    random.Random(settings.sampling.seed).shuffle(order)
    count = round(settings.holdout_fraction * len(data))
    if not 0 < count < len(data):
        raise SearchConfigError(
            f"--holdout-fraction {settings.holdout_fraction} of {len(data)} items leaves "
            f"{count} for the hold-out and {len(data) - count} for the search; both need one"
        )
    held = set(order[:count])
    return [d for i, d in enumerate(data) if i not in held], [data[i] for i in sorted(held)]


def make_guard(settings, scorer):
    if settings.guard is None:
        return None
    from mergekit_expo.search.guard import parse_guard

    guard = parse_guard(settings.guard, device=settings.device,
                        batch_size=settings.sampling.batch_size)
    if guard.needs_responses and not scorer.generates:
        raise SearchConfigError(
            f"--guard {settings.guard} scores sampled responses, but the DPO scorer (--pairs) "
            "samples none; use --guard loglik:TEXTS.jsonl with --pairs"
        )
    return guard


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


def lambda_searched(settings) -> bool:
    return bool(settings.trials and settings.lambdas and len(set(settings.lambdas)) > 1)


def extended_key(settings, groups: list[Group], guard) -> dict[str, Any]:
    """What the per-group, guard and hold-out options add to the results key (nothing if
    unused, so a plain run's rows stay valid)."""
    key: dict[str, Any] = {}
    if groups:
        key["groups"] = [g.describe() for g in groups]
    if guard is not None:
        key |= guard.identity()
    if settings.holdout_prompts is not None or settings.holdout_fraction:
        key["holdout"] = {"fraction": settings.holdout_fraction,
                          "file": str(settings.holdout_prompts or "")}
    return key


def run_trials(settings, session, rows, lambdas) -> list[dict[str, Any]]:
    """``--trials N`` per-group candidates from Optuna, starting from the uniform grid."""
    from mergekit_expo.search import trials

    groups = tuple(sorted(set(session.assignment.values())))
    alphas = settings.trial_alpha or (min(settings.alphas), max(settings.alphas))
    searched = lambda_searched(settings)
    space = trials.TrialSpace(
        groups=groups, alpha=tuple(alphas), step=settings.trial_step,
        lam=(min(lambdas), max(lambdas)) if searched else None,
        fixed_lambda=0.0 if searched else float(lambdas[0]),
    )
    finished = [r for r in session.results.rows.values() if r.get("groups") is not None]

    def evaluate(values, number):
        return session.score({"alpha": None, "lambda": None, "trial": number, "groups": values},
                             {g: tuple(v) for g, v in values.items()})

    drop = None
    if session.guard is not None:
        from mergekit_expo.search.guard import baseline

        base = baseline(rows)

        def drop(row):
            return None if base is None or row.get("guard_mean") is None else (
                base - row["guard_mean"])
    return trials.run_trials(
        space, trials=settings.trials, seed=settings.trial_seed, grid_rows=rows,
        finished=finished, lookup=session.results.finished_groups, evaluate=evaluate,
        guard_drop=drop, max_drop=settings.max_guard_drop,
    )


def winner_config(search, winner, groups, assignment) -> dict[str, Any]:
    if winner.get("groups") is None:
        return best_config(search, winner["alpha"], winner["lambda"])
    values = winner["groups"]
    lambdas = {v[1] for v in values.values()}
    config = grouped_config(search, groups, assignment, values, with_lambda=len(lambdas) > 1)
    if len(lambdas) == 1 and (lambdas != {0.0} or "lambda" in config["parameters"]):
        config["parameters"]["lambda"] = lambdas.pop()
    return config


def score_holdout(session, holdout_data, winner, best_uniform, make_scorer) -> list[dict]:
    """The winner (and the best uniform candidate) on the hold-out split, cached in
    ``holdout.jsonl`` under the run's key."""
    settings = session.settings
    path = Path(settings.out_dir) / HOLDOUT_NAME
    cache = ResultsFile(path, settings_key({**session.key_settings, "split": "holdout"}))
    out, done = [], set()
    for label, row in (("winner", winner), ("best uniform", best_uniform)):
        if row is None:
            continue
        ident = row.get("groups") or (row["alpha"], row["lambda"])
        if str(ident) in done:
            out.append({**out[-1], "which": f"{out[-1]['which']} = {label}"})
            continue
        done.add(str(ident))
        found = (cache.finished_groups(row["groups"]) if row.get("groups") is not None
                 else cache.finished(row["alpha"], row["lambda"]))
        if found is None:
            found = _measure_holdout(session, holdout_data, row, cache, make_scorer)
        out.append({
            "which": label, "groups": row.get("groups"), "alpha": row.get("alpha"),
            "lambda": row.get("lambda"), "search_mean": row["mean"], "search_sem": row["sem"],
            "search_n": row["n"], "holdout_mean": found.get("mean"),
            "holdout_sem": found.get("sem"), "holdout_n": found.get("n"),
        })
    return out


def _measure_holdout(session, data, row, cache, make_scorer) -> dict[str, Any]:
    evaluator = session.get()
    # the run's scorer (its reward model is loaded already); DPO accuracy needs the hold-out pairs
    scorer = (make_scorer(session.settings, data) if session.settings.scorer.kind == "dpo"
              else session.scorer)
    sampler = evaluator.prepare(scorer, data)
    if row.get("groups") is not None:
        values = {g: tuple(v) for g, v in row["groups"].items()}
    else:
        values = dict.fromkeys(set(session.assignment.values()), (row["alpha"], row["lambda"]))
    measured = evaluator.measure(values, scorer=scorer, data=data, sampler=sampler)
    head = {"alpha": row.get("alpha"), "lambda": row.get("lambda")}
    if row.get("groups") is not None:
        head["groups"] = row["groups"]
    found = {**head, **measured}
    cache.append(found)
    return found
