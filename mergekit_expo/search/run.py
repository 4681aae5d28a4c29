"""Grid search over α (and λ) with α treated as a decoding hyperparameter.

For each candidate the model's weights are set in place from θ₀, θ_T (and θ̄), answers to the
held-out prompts are sampled and scored, and a row is appended to ``results.jsonl``. Inputs are
read once and no model is written or reloaded; only the winner is merged for real, by mergekit,
with ``write_best``. See docs/search.md.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from mergekit_expo import __version__
from mergekit_expo.search.capability import make_guard
from mergekit_expo.search.groups import Group, groups_of, winner_config
from mergekit_expo.search.holdout import score_holdout, split_holdout
from mergekit_expo.search.merge_config import SearchConfig, SearchConfigError, best_config
from mergekit_expo.search.outputs import (
    OutputWriteError,
    make_folder,
    write_failure,
    write_folder,
    write_text,
)
from mergekit_expo.search.prompts import file_digest
from mergekit_expo.search.results import (
    ResultsFile,
    candidate_text,
    describe_groups,  # noqa: F401 - imported from here by the CLI
    files_identity,
    settings_key,
)
from mergekit_expo.search.scorers import ScorerError
from mergekit_expo.search.settings import NO_PROMPTS, SearchSettings
from mergekit_expo.search.trials import lambda_searched, search_trials

LOG = logging.getLogger("mergekit_expo")

RESULTS_NAME = "results.jsonl"
PLOT_NAME = "search.png"
GUARD_PLOT_NAME = "guard.png"
BEST_CONFIG_NAME = "best.yml"
BEST_ADAPTER_NAME = "best_adapter"


@dataclass
class SearchReport:
    rows: list[dict[str, Any]]  # one per grid candidate, in grid order
    winner: dict[str, Any] | None
    results: Path
    plot: Path | None
    best_config: Path | None
    merged: Path | None = None
    adapter: Path | None = None  # the winner as a LoRA adapter (adapter-based configs)
    skipped: int = 0  # candidates found finished in the results file
    notes: list[str] = field(default_factory=list)
    merge_command: str | None = None  # how to merge best.yml, runnable as printed
    trials: list[dict[str, Any]] = field(default_factory=list)  # per-group rows, in order
    guard_plot: Path | None = None
    holdout: list[dict[str, Any]] = field(default_factory=list)  # search vs hold-out scores
    evaluated: int = 0  # candidates scored by this run (grid and trials)


def run_search(settings: SearchSettings) -> SearchReport:
    """Score every (α, λ) of the grid, resuming from the results file; merge the winner if asked."""
    from mergekit_expo.search.merge_config import load_search_config
    from mergekit_expo.search.vllm_engine import resolve_engine

    settings = settings.model_copy(update={"engine": resolve_engine(settings.engine,
                                                                    settings.device)})
    search = load_search_config(settings.config)
    refuse_out_dir_in_an_input(search, settings.out_dir)
    if settings.write_best is not None:  # not after hours of candidates
        refuse_write_best_target(search, settings.write_best)
    for note in search.notes:
        LOG.warning("expo search: %s", note)
    lambdas = settings.lambdas
    if lambdas is None:
        lambdas = [search.config_lambda or 0.0]
    grid = [(alpha, lam) for lam in lambdas for alpha in settings.alphas]
    _check_grid(search, lambdas)
    if settings.guard is not None and (0.0, 0.0) not in grid:
        grid.insert(0, (0.0, 0.0))  # θ_T: the guard's baseline

    if settings.scorer.kind in NO_PROMPTS and settings.prompts is not None:
        LOG.warning("expo search: --prompts is not used by the %s scorer", settings.scorer.kind)
    data, holdout_data = split_holdout(settings, _read_data(settings))
    scorer = _make_scorer(settings, data)
    guard = make_guard(settings, scorer)
    groups, assignment = groups_of(settings, search)
    rehearse_best(search, settings, groups, assignment, grid)
    out_dir = make_folder(settings.out_dir)
    key_settings = _key_settings(settings, search, scorer)
    key_settings |= extended_key(settings, groups, guard)
    results = ResultsFile(out_dir / RESULTS_NAME, settings_key(key_settings))
    pending = [c for c in grid if results.finished(*c) is None]
    skipped = len(grid) - len(pending)
    if skipped:
        LOG.info("expo search: %d of %d candidates already in %s", skipped, len(grid), results.path)
    if results.other_rows:
        LOG.info(
            "expo search: %d rows in %s were made with other settings and are not reused",
            results.other_rows, results.path,
        )
    need_mids = any(lam for _, lam in grid) or lambda_searched(settings)
    session = _Session(settings, search, scorer, data, assignment, guard, results, key_settings,
                       need_mids=need_mids)
    try:
        if pending:
            _score_candidates(session, pending)
        rows = [results.finished(*c) for c in grid]
        trials = search_trials(settings, session, rows, lambdas) if settings.trials else []
    finally:
        session.close()  # the Ray actors and their engines, if any (also when one failed)
    if session.evaluator is not None:
        LOG.info("expo search: %s", update_summary(session.evaluator))
    everything = [*rows, *trials]
    if guard is not None:
        from mergekit_expo.search.capability import annotate, baseline, pick_guarded_winner

        annotate(everything, baseline(rows), settings.max_guard_drop)
        winner = pick_guarded_winner(everything)
    else:
        winner = pick_winner(everything)
    report = SearchReport(
        rows=rows, winner=winner, results=results.path, plot=None, best_config=None,
        skipped=skipped, notes=search.notes, trials=trials,
    )
    if winner is not None:  # the winner's files first, the plots after them
        best = winner_config(search, winner, groups, assignment)
        verify_winner(search, best, winner, assignment)
        report.best_config = write_text(out_dir / BEST_CONFIG_NAME,
                                        yaml.safe_dump(best, sort_keys=False))
        report.merge_command = merge_command(search, report.best_config, out_dir)
        if holdout_data is not None:
            uniform = [r for r in rows if r is not None]
            best_uniform = (pick_guarded_winner(uniform) if guard is not None
                            else pick_winner(uniform))
            report.holdout = score_holdout(
                session, holdout_data, winner, best_uniform, _make_scorer
            )
        if search.uses_adapters:
            report.adapter = write_best_adapter(
                search, winner["alpha"], winner["lambda"], out_dir / BEST_ADAPTER_NAME
            )
    score_label = _score_label(settings)
    report.plot = _plot(rows, out_dir / PLOT_NAME, winner if winner in rows else None, score_label)
    if guard is not None:
        report.guard_plot = _guard_plot(everything, out_dir / GUARD_PLOT_NAME, winner,
                                        score_label, settings)
    if winner is not None:
        if settings.write_best is not None:
            scorer = guard = session.scorer = session.guard = session.evaluator = None
            gc.collect()
            report.merged = write_best(report.best_config, settings.write_best, settings)
    report.evaluated = session.evaluated
    return report


def pick_winner(rows: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Highest mean score; ties go to the earlier candidate in grid order. Failures never win."""
    best = None
    for row in rows:
        if row is None or row.get("mean") is None:
            continue
        if best is None or row["mean"] > best["mean"]:
            best = row
    return best


def verify_winner(search: SearchConfig, best: dict[str, Any], winner: dict[str, Any],
                  assignment: dict[str, str]) -> None:
    """``best.yml`` planned as the merge will plan it gives every tensor the scored (α, λ)."""
    from mergekit_expo.search.merge_config import values_by_tensor, verify_best

    if winner.get("groups") is not None:
        values = {g: tuple(v) for g, v in winner["groups"].items()}
    else:
        values = dict.fromkeys(set(assignment.values()), (winner["alpha"], winner["lambda"]))
    verify_best(search, best, values_by_tensor(assignment, values))


def rehearse_best(search: SearchConfig, settings: SearchSettings, groups: list[Group],
                  assignment: dict[str, str], grid: list[tuple[float, float]]) -> None:
    """Before the first candidate: the ``best.yml`` a uniform winner would get, and with groups
    one with a different value per group, are planned and verified as the winner's will be, so
    that a config the merge would refuse does not surface after hours of candidates."""
    alpha, lam = grid[-1]
    winners = [{"alpha": alpha, "lambda": lam}]
    if groups:
        names = sorted(set(assignment.values()))
        searched = lambda_searched(settings)
        winners.append({"alpha": None, "lambda": None, "groups": {
            name: [0.05 * (index + 1), 0.05 * index if searched else lam]
            for index, name in enumerate(names)}})
    for winner in winners:
        verify_winner(search, winner_config(search, winner, groups, assignment), winner,
                      assignment)


def refuse_out_dir_in_an_input(search: SearchConfig, out_dir: Path) -> None:
    """OUT_DIR gets results, plots and best.yml: never inside an input's folder (inputs are
    never written). An OUT_DIR that contains the inputs is fine: the search adds only its own
    files there."""
    from mergekit_expo.output.folder import input_problem
    from mergekit_expo.plan.scopes import local_inputs

    problem = input_problem(out_dir, local_inputs(search.plan.config))
    if problem and " contains " not in problem:
        raise SearchConfigError(f"OUT_DIR: {problem}")


def refuse_write_best_target(search: SearchConfig, out: Path) -> None:
    """What would stop ``--write-best`` after the search, refused before the first candidate:
    what the merge refuses of an output folder (a file in the way, an input's folder, another
    kind of artefact), a folder that cannot be written, too little free disk space."""
    import os

    from mergekit_expo.check.forecast import disk_findings, output_findings

    out = Path(out)
    refused = [f.message for f in output_findings(search.plan.config, out)]
    if refused:
        raise SearchConfigError(f"--write-best {out}: " + "; ".join(refused))
    existing = out.resolve()
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SearchConfigError(
            f"--write-best {out}: {existing} is not writable; choose a folder you can write to"
        )
    if search.plan.tensors:
        refused = [f.message for f in disk_findings(search.plan.output_bytes()[0], out)[1]]
        if refused:
            raise SearchConfigError(f"--write-best {out}: " + "; ".join(refused))


def merge_command(search: SearchConfig, best: Path, out_dir: Path) -> str:
    """The command that merges ``best.yml``, runnable as printed."""
    command = f"mergekit-yaml {best.resolve()} OUT"
    if search.uses_adapters:  # mergekit merges each BASE+ADAPTER into this folder first
        command += f" --lora-merge-cache {(out_dir / 'lora_merge_cache').resolve()}"
    return command


def write_best(config_path: Path, out: Path, settings: SearchSettings) -> Path:
    """Run the real mergekit merge on the winner's config, in this process."""
    from mergekit.merge import MergeOptions, run_merge

    from mergekit_expo.plan.build import load

    text = config_path.read_text(encoding="utf-8")
    config = load(config_path)  # the plan's reading, as every surface reads a config
    LOG.info("expo search: merging the winner (%s) into %s", config_path, out)
    # on the CPU, as the search computed the candidate: the winner is then bit for bit the same
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="expo-lora-") as cache:  # `BASE+ADAPTER` inputs
            options = MergeOptions(
                copy_tokenizer=True, quiet=not settings.progress, lora_merge_cache=cache
            )
            run_merge(config, str(out), options=options, config_source=text)
    except Exception as error:  # OUT is as it was: the merge is staged (docs/failures.md)
        failure = write_failure(error)
        if failure is None:
            raise
        raise OutputWriteError(out, failure) from error
    return out


def write_best_adapter(search: SearchConfig, alpha: float, lam: float, out: Path) -> Path | None:
    """The winner of an adapter search as one PEFT adapter (docs/lora.md), if it is one."""
    from mergekit_expo.lora.adapter import AdapterError
    from mergekit_expo.lora.extrapolate import expo_adapter

    adapters = [m.lora.path for m in (*search.intermediates, search.final)] if lam else [
        search.final.lora.path
    ]
    reference = search.reference.lora.path if search.reference.lora else None
    try:  # staged beside OUT_DIR/best_adapter: a full disk leaves no partial or stale adapter
        return write_folder(out, lambda staged: expo_adapter(
            adapters, staged, alpha=alpha, lam=lam, reference_adapter=reference,
            base=search.final.model.path,
        ))
    except AdapterError as error:
        LOG.warning("expo search: the winner is not written as an adapter: %s", error)
        return None


# -- the loop ------------------------------------------------------------------------------


class _Session:
    """What the grid, the trials and the hold-out check share; the model is loaded on first use
    only, so a fully resumed run loads nothing."""

    def __init__(self, settings, search, scorer, data, assignment, guard, results, key_settings,
                 *, need_mids: bool):
        self.settings, self.search, self.scorer, self.data = settings, search, scorer, data
        self.assignment, self.guard, self.results = assignment, guard, results
        self.key_settings, self.need_mids = key_settings, need_mids
        self.evaluator = None
        self.evaluated = 0
        self.pool = None  # the Ray actors (ray_pool), made on first use
        self.pool_wanted = settings.workers > 1 or settings.ray_address is not None

    def get(self):
        from mergekit_expo.search.evaluator import Evaluator

        if self.evaluator is None:
            self.evaluator = Evaluator(
                self.settings, self.search, self.scorer, self.data, assignment=self.assignment,
                guard=self.guard, need_intermediates=self.need_mids,
            )
        return self.evaluator

    def score_many(self, jobs: list[tuple[dict[str, Any], Any]]) -> list[dict[str, Any]]:
        """Score ``[(head, values), ...]`` (in parallel with a pool), append each row to the
        results file as it finishes, and return the rows in the order of ``jobs``."""
        if not self.pool_wanted:
            return [self.score(head, values) for head, values in jobs]
        rows: dict[int, dict[str, Any]] = {}  # id of the job's head → its row

        def record(head, measured, seconds):
            rows[id(head)] = self.record(head, measured, seconds)

        self.get_pool().run(jobs, record)
        return [rows[id(head)] for head, _ in jobs]

    def score(self, head: dict[str, Any], values) -> dict[str, Any]:
        """Score one candidate, append its row to the results file and return it."""
        if self.pool_wanted:  # --workers/--ray-address: one of the pool's actors scores it
            return self.score_many([(head, values)])[0]
        started = time.perf_counter()
        try:
            measured = self.get().measure(values)
        except ScorerError as error:  # the scorer's own code raised: what it was scoring
            raise ScorerError(
                f"{candidate_text(head)}: {error}; {self.results.resume_note()}"
            ) from error
        return self.record(head, measured, time.perf_counter() - started)

    def get_pool(self):
        from mergekit_expo.search.ray_pool import Pool

        if self.pool is None:
            self.pool = Pool(self)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def record(self, head: dict[str, Any], measured: dict[str, Any], seconds: float):
        """A scored candidate's row, appended to the results file (by this process only)."""
        row = {**head, **measured}
        row["seconds"] = round(seconds, 3)
        row["mergekit_expo"] = __version__
        row["settings"] = self.key_settings
        self.results.append(row)
        self.evaluated += 1
        if self.settings.progress:
            tqdm.write(describe(row))
        else:
            LOG.info("expo search: %s", describe(row))
        return row


def _score_candidates(session: _Session, pending) -> None:
    if session.pool_wanted:  # every candidate to whichever actor is idle
        jobs = [({"alpha": a, "lambda": lam}, dict.fromkeys(set(session.assignment.values()),
                                                            (a, lam))) for a, lam in pending]
        session.get_pool().run(jobs, session.record)
        return
    bar = tqdm(pending, desc="Candidates", disable=not session.settings.progress)
    for alpha, lam in bar:
        bar.set_postfix_str(f"α={alpha:g} λ={lam:g}")
        values = dict.fromkeys(set(session.assignment.values()), (alpha, lam))
        session.score({"alpha": alpha, "lambda": lam}, values)
    bar.close()


def update_summary(evaluator) -> str:
    """Time to map the inputs and build the model once, against the per-candidate update."""
    weights = evaluator.candidates
    resident = getattr(weights, "resident", False)
    where = "resident on the device" if resident else "mapped, streamed per candidate"
    updates = evaluator.update_times
    median = f"{statistics.median(updates):.2f} s" if updates else "–"
    return (
        f"inputs ({where}) and model ready in {evaluator.read_seconds:.1f} s; "
        f"weights update per candidate: median {median} over {len(updates)}"
    )


def describe(row: dict[str, Any]) -> str:
    """One line per candidate for the console."""
    head = candidate_text(row) + ": "
    if row.get("mean") is None:
        return head + f"failed ({row.get('error', 'no score')})"
    text = head + f"score {row['mean']:.4g} ± {row['sem']:.2g} (sd {row['std']:.3g}, n {row['n']})"
    if row.get("mean_length_tokens") is not None:
        text += f", length {row['mean_length_tokens']:.1f} tokens"
    if row.get("mean_margin") is not None:
        text += f", margin {row['mean_margin']:.4g}"
    if row.get("guard_mean") is not None:
        text += f", guard {row['guard_mean']:.4g}"
    if row.get("update_seconds") is not None:
        text += f", weights updated in {row['update_seconds']:.2f} s"
    return text + f", {row['seconds']:.1f} s"


def _check_grid(search: SearchConfig, lambdas: list[float]) -> None:
    if any(lambdas) and not search.intermediates:
        raise SearchConfigError(
            f"the lambda grid {lambdas} has non-zero values, but {search.path} lists no "
            f"intermediate checkpoint besides the final model {search.final}. List the "
            "iterative-DPO checkpoints before the final one, or search lambda 0 only."
        )
    if search.intermediates and not any(lambdas):
        LOG.warning(
            "expo search: lambda is 0 for every candidate, so the intermediate checkpoints %s "
            "are ignored (plain ExPO on %s); pass --lambda (e.g. 0,0.3) to use them",
            [str(m) for m in search.intermediates], search.final,
        )


def _read_data(settings: SearchSettings):
    from mergekit_expo.search.prompts import read_pairs, read_prompts

    if settings.scorer.kind == "lm_eval":  # the tasks bring their own documents
        return []
    if settings.scorer.kind == "dpo":
        data = read_pairs(settings.scorer.pairs)
    else:
        data = read_prompts(settings.prompts)
    return data[: settings.limit] if settings.limit else data


def _make_scorer(settings: SearchSettings, data):
    from mergekit_expo.search import scorers

    spec = settings.scorer
    batch = settings.sampling.batch_size
    if spec.kind == "callable":
        return scorers.CallableScorer(spec.function)
    if spec.kind == "reward_model" and spec.engine == "vllm":
        from mergekit_expo.search.vllm_reward import VllmRewardScorer

        return VllmRewardScorer(spec.path)
    if spec.kind == "reward_model":
        return scorers.RewardModelScorer(spec.path, device=settings.device, batch_size=batch)
    if spec.kind == "lm_eval":
        from mergekit_expo.search.lm_eval_guard import LmEvalScorer

        return LmEvalScorer(spec.tasks, settings.lm_eval_args, batch_size=batch)
    return scorers.DpoAccuracyScorer(data, spec.pairs, beta=spec.beta, batch_size=batch)


def _key_settings(settings: SearchSettings, search: SearchConfig, scorer) -> dict[str, Any]:
    """Everything but α and λ that decides a score: a change here means fresh rows."""
    config = best_config(search, 0.0, 0.0)
    config["parameters"].pop("alpha", None)
    config["parameters"].pop("lambda", None)
    models = [search.reference, search.final, *search.intermediates]
    return {
        "config": config,
        "model_files": {str(m): files_identity(str(m.model.path)) for m in models},
        **({"adapter_files": {str(m): files_identity(str(m.lora.path)) for m in models if m.lora}}
           if search.uses_adapters else {}),
        "scorer": scorer.identity(),
        "prompts_sha256": (
            file_digest(settings.prompts) if settings.scorer.kind not in NO_PROMPTS else None
        ),
        "limit": settings.limit,
        "sampling": settings.sampling.model_dump(),
        "device": settings.device,
    }


def _score_label(settings: SearchSettings) -> str:
    spec = settings.scorer
    if spec.kind == "dpo":
        return f"DPO implicit-reward accuracy (β = {spec.beta:g})"
    if spec.kind == "reward_model":
        return f"reward ({Path(spec.path).name})"
    if spec.kind == "lm_eval":
        return f"lm-eval ({spec.tasks})"
    module, _, function = spec.function.rpartition(":")
    return f"score ({Path(module).name}:{function})"


def _guard_plot(rows, out: Path, winner, label: str, settings) -> Path | None:
    from mergekit_expo.search.plot import plot_guard

    scored = [r for r in rows if r is not None and r.get("guard_mean") is not None]
    if not scored:
        return None
    return plot_guard(scored, out, winner=winner, score_label=label,
                      guard_label=f"guard ({settings.guard})", max_drop=settings.max_guard_drop)


def _plot(rows, out: Path, winner, label: str) -> Path | None:
    scored = [r for r in rows if r is not None]
    if not scored:
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:  # pragma: no cover - matplotlib is an install requirement
        LOG.warning("expo search: no plot (%s); pip install matplotlib", error)
        return None
    from mergekit_expo.search.plot import plot_search

    return plot_search(scored, out, winner=winner, score_label=label)


def extended_key(settings, groups: list[Group], guard) -> dict[str, Any]:
    """What the per-group, guard and hold-out options add to the results key (nothing if
    unused, so a plain run's rows stay valid)."""
    key: dict[str, Any] = {}
    if groups:
        key["groups"] = [g.describe() for g in groups]
    if guard is not None:
        key |= guard.identity()
    if settings.engine == "vllm":  # another sampler: other responses for the same seed
        key["engine"] = {"name": "vllm", "args": settings.vllm_args}
    if settings.holdout_prompts is not None or settings.holdout_fraction:
        key["holdout"] = {"fraction": settings.holdout_fraction,
                          "file": str(settings.holdout_prompts or "")}
    return key
