"""Per-group α (and λ) found by Optuna, starting from the uniform grid, resumable.

Every finished uniform grid candidate enters the study as a trial with the same α (and λ) in
every group, so the sampler starts from the grid (its best point included) instead of from
scratch; every finished per-group trial in ``results.jsonl`` (same results key) is replayed
into the study the same way, so a re-run evaluates only the trials still missing. With a guard
and ``--max-guard-drop``, the drop beyond ε is an Optuna constraint (TPE then prefers
feasible regions).

With ``--workers N`` the study proposes N trials at a time (Optuna's ask/tell; TPE with
``constant_liar``, so trials still running count as poor results and the N proposals spread
out), scores them in parallel, and tells their results in trial order before it asks again.
The proposals then depend on the seed and N only, never on which worker finishes first: a
pooled run is reproducible for a given N and seed, and N = 1 is the serial run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger("mergekit_expo")


@dataclass(frozen=True)
class TrialSpace:
    groups: tuple[str, ...]
    alpha: tuple[float, float]
    lam: tuple[float, float] | None  # None: λ fixed at ``fixed_lambda`` in every group
    step: float | None
    fixed_lambda: float = 0.0

    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import FloatDistribution

        out = {f"alpha:{g}": FloatDistribution(*self.alpha, step=self.step) for g in self.groups}
        if self.lam is not None:
            out |= {f"lambda:{g}": FloatDistribution(*self.lam, step=self.step)
                    for g in self.groups}
        return out

    def values(self, params: dict[str, float]) -> dict[str, list[float]]:
        """Group → [α, λ], rounded to 10 decimals (so 0.35 is written as 0.35)."""
        return {
            g: [round(params[f"alpha:{g}"], 10),
                round(params[f"lambda:{g}"], 10) if self.lam else self.fixed_lambda]
            for g in self.groups
        }

    def params(self, values: dict[str, Sequence[float]]) -> dict[str, float]:
        out = {f"alpha:{g}": float(values[g][0]) for g in self.groups}
        if self.lam is not None:
            out |= {f"lambda:{g}": float(values[g][1]) for g in self.groups}
        return out

    def contains(self, values: dict[str, Sequence[float]]) -> bool:
        distributions = self.distributions()
        return all(
            distributions[k]._contains(distributions[k].to_internal_repr(v))
            for k, v in self.params(values).items()
        )


def run_trials(
    space: TrialSpace,
    *,
    trials: int,
    seed: int,
    grid_rows: Sequence[dict[str, Any] | None],
    finished: Sequence[dict[str, Any]],
    lookup: Callable[[dict[str, list[float]]], dict[str, Any] | None],
    evaluate: Callable[[list[tuple[dict[str, list[float]], int]]], list[dict[str, Any]]],
    guard_drop: Callable[[dict[str, Any]], float | None] | None = None,
    max_drop: float | None = None,
    parallel: int = 1,
) -> list[dict[str, Any]]:
    """Run the study until it holds ``trials`` per-group trials; return their rows in order.

    ``finished``: per-group rows already in the results file; ``lookup`` finds a row for given
    values; ``evaluate([(values, number), ...])`` scores new candidates (in parallel if it can),
    appends their rows and returns them in order; ``parallel``: trials proposed at a time.
    """
    import optuna

    # Optuna's per-trial INFO lines would drown the search's own; quiet for this study only
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return _run_study(space, trials=trials, seed=seed, grid_rows=grid_rows,
                          finished=finished, lookup=lookup, evaluate=evaluate,
                          guard_drop=guard_drop, max_drop=max_drop, parallel=parallel)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _run_study(space, *, trials, seed, grid_rows, finished, lookup, evaluate, guard_drop,
               max_drop, parallel) -> list[dict[str, Any]]:
    import optuna
    from optuna.trial import TrialState, create_trial

    constrained = guard_drop is not None and max_drop is not None

    def constraint(row: dict[str, Any]) -> float:
        drop = guard_drop(row)
        return float("inf") if drop is None else drop - max_drop

    # the grid is the start-up design: TPE models its rows from the first trial on, so the
    # first proposals sit around the best uniform α instead of being drawn at random
    grid_count = sum(row is not None for row in grid_rows)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=0 if grid_count >= 2 else 10,
                                         constant_liar=parallel > 1)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    distributions = space.distributions()

    def add(row: dict[str, Any], values: dict[str, Sequence[float]]) -> None:
        if not space.contains(values):
            return
        failed = row.get("mean") is None
        limits = {"guard": constraint(row)} if constrained and not failed else None
        study.add_trial(create_trial(
            state=TrialState.FAIL if failed else TrialState.COMPLETE,
            value=None if failed else row["mean"], params=space.params(values),
            distributions=distributions, constraints=limits,
        ))

    for row in grid_rows:  # the uniform grid: the same (α, λ) in every group
        if row is not None:
            add(row, {g: (row["alpha"], row["lambda"]) for g in space.groups})
    rows = sorted(finished, key=lambda r: r.get("trial", 0))[:trials]
    for row in rows:
        add(row, row["groups"])
    if rows:
        LOG.info("expo search: %d of %d trials already in the results file", len(rows), trials)
    while len(rows) < trials:
        asked = [study.ask(distributions) for _ in range(min(parallel, trials - len(rows)))]
        batch = [(space.values(t.params), len(rows) + k) for k, t in enumerate(asked)]
        for trial, row in zip(asked, _score_batch(batch, lookup, evaluate), strict=True):
            rows.append(row)
            if row.get("mean") is None:
                study.tell(trial, state=TrialState.FAIL)
                continue
            if constrained:
                trial.set_constraint("guard", constraint(row))
            study.tell(trial, row["mean"])
    return rows


def _score_batch(batch, lookup, evaluate) -> list[dict[str, Any]]:
    """Rows for ``[(values, number), ...]``: found in the results file, else scored (values
    proposed twice in one batch are scored once, as a serial run would find the first row)."""
    found = [lookup(values) for values, _ in batch]
    keys = [repr(sorted(values.items())) for values, _ in batch]
    first = {}
    for key, job, row in zip(keys, batch, found, strict=True):
        if row is None:
            first.setdefault(key, job)
    scored = dict(zip(first, evaluate(list(first.values())), strict=True))
    return [row or scored[key] for key, row in zip(keys, found, strict=True)]


def lambda_searched(settings) -> bool:
    return bool(settings.trials and settings.lambdas and len(set(settings.lambdas)) > 1)


def search_trials(settings, session, rows, lambdas) -> list[dict[str, Any]]:
    """``--trials N`` per-group candidates from Optuna, starting from the uniform grid."""
    groups = tuple(sorted(set(session.assignment.values())))
    alphas = settings.trial_alpha or (min(settings.alphas), max(settings.alphas))
    searched = lambda_searched(settings)
    space = TrialSpace(
        groups=groups, alpha=tuple(alphas), step=settings.trial_step,
        lam=(min(lambdas), max(lambdas)) if searched else None,
        fixed_lambda=0.0 if searched else float(lambdas[0]),
    )
    finished = [r for r in session.results.rows.values() if r.get("groups") is not None]

    def evaluate(jobs):
        return session.score_many([
            ({"alpha": None, "lambda": None, "trial": number, "groups": values},
             {g: tuple(v) for g, v in values.items()}) for values, number in jobs])

    drop = None
    if session.guard is not None:
        from mergekit_expo.search.capability import baseline

        base = baseline(rows)

        def drop(row):
            return None if base is None or row.get("guard_mean") is None else (
                base - row["guard_mean"])
    return run_trials(
        space, trials=settings.trials, seed=settings.trial_seed, grid_rows=rows,
        finished=finished, lookup=session.results.finished_groups, evaluate=evaluate,
        guard_drop=drop, max_drop=settings.max_guard_drop,
        parallel=settings.workers if session.pool_wanted else 1,
    )
