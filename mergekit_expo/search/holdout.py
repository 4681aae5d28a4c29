"""The hold-out check: the winner (and the best uniform candidate) scored on prompts the
search did not choose it on, cached in ``holdout.jsonl`` under the run's results key."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from mergekit_expo.search.merge_config import SearchConfigError
from mergekit_expo.search.results import ResultsFile, candidate_text, settings_key
from mergekit_expo.search.scorers import ScorerError

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
            out[-1] = {**out[-1], "which": f"{out[-1]['which']} = {label}"}  # one line
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
    try:
        measured = evaluator.measure(values, scorer=scorer, data=data, sampler=sampler)
    except ScorerError as error:  # the scorer's own code raised: what it was scoring
        raise ScorerError(f"the hold-out of {candidate_text(row)}: {error}; "
                          f"{session.results.resume_note()}") from error
    head = {"alpha": row.get("alpha"), "lambda": row.get("lambda")}
    if row.get("groups") is not None:
        head["groups"] = row["groups"]
    found = {**head, **measured}
    cache.append(found)
    return found
