"""``--workers``: a local Ray cluster on the CPU scores the same rows as a serial run, trials
run several at a time and stay reproducible, a worker that dies is replaced and its candidate
scored again, and a candidate that keeps killing workers stops the run with one clear error."""

from __future__ import annotations

import textwrap

import pytest
from conftest import search_inputs
from engines import need

from mergekit_expo.search.run import run_search
from mergekit_expo.search.settings import SearchSettings

PROMPTS = ["The assistant answers the question", "A helpful answer is", "Numbers 0 1 2 3"]
TIMING = {"seconds", "update_seconds", "settings", "key"}  # key: the scorer's name differs


@pytest.fixture(scope="module")
def pool_case(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    config, prompts = search_inputs(zoo, root, "pool", seed=8, final_seed=80, scale=0.03,
                                    prompts=PROMPTS)
    scorer = root / "pool_scorer.py"
    scorer.write_text(textwrap.dedent(f"""
        import os

        def score(prompt, response):
            return float(len(set(response.split()))) - 0.01 * len(response)

        def always_dies(prompt, response):
            os._exit(3)

        def dies_once(prompt, response):  # the first call anywhere kills its process
            marker = {str(root / "died")!r}
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(3)
            return score(prompt, response)
    """))
    return {"config": config, "prompts": prompts, "scorer": scorer, "root": root}


def run(case, out, function, **extra):
    settings = SearchSettings.model_validate({
        "config": case["config"], "out_dir": out, "alphas": [0.1, 0.3, 0.5],
        "prompts": case["prompts"], "progress": False, "engine": "hf",
        "scorer": {"kind": "callable", "function": f"{case['scorer']}:{function}"},
        "sampling": {"max_new_tokens": 6, "batch_size": 4, "temperature": 0.7},
        "groups": ["modules"], "trials": 2, **extra,
    })
    return run_search(settings)


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def serial_rows(case, rows, **extra):
    """Each row's candidate scored again in this process, by the serial evaluator."""
    from mergekit_expo.search.evaluator import Evaluator
    from mergekit_expo.search.groups import groups_of
    from mergekit_expo.search.merge_config import load_search_config
    from mergekit_expo.search.prompts import read_prompts
    from mergekit_expo.search.run import _make_scorer

    settings = SearchSettings.model_validate({
        "config": case["config"], "out_dir": case["root"], "prompts": case["prompts"],
        "progress": False, "engine": "hf", "scorer": {
            "kind": "callable", "function": f"{case['scorer']}:score"},
        "sampling": {"max_new_tokens": 6, "batch_size": 4, "temperature": 0.7},
        "groups": ["modules"], **extra})
    search, data = load_search_config(case["config"]), read_prompts(case["prompts"])
    assignment = groups_of(settings, search)[1]
    evaluator = Evaluator(settings, search, _make_scorer(settings, data), data,
                          assignment=assignment)
    return [evaluator.measure({g: tuple(v) for g, v in row["groups"].items()}) for row in rows]


def test_two_ray_workers_give_the_serial_rows_and_survive_a_dead_worker(pool_case, tmp_path,
                                                                         monkeypatch):
    need("ray")
    import ray

    serial = run(pool_case, tmp_path / "serial", "score")
    pooled = run(pool_case, tmp_path / "pooled", "dies_once", workers=2, trials=4)
    assert (pool_case["root"] / "died").exists()  # a worker really died on the way
    assert comparable(pooled.rows) == comparable(serial.rows)
    assert pooled.evaluated == 3 + 4
    # the trials ran two at a time: other proposals than the serial run's, each scored as the
    # serial evaluator scores the same candidate
    assert [r["trial"] for r in pooled.trials] == [0, 1, 2, 3]
    again = serial_rows(pool_case, pooled.trials)
    for row, expected in zip(pooled.trials, again, strict=True):
        assert row["scores"] == expected["scores"] and row["mean"] == expected["mean"]
    lines = (tmp_path / "pooled" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 + 4  # each candidate once, written by the driver
    assert not ray.is_initialized()  # the run's own cluster is shut down at its end

    def no_cluster(*args, **kwargs):
        raise AssertionError("a run with nothing left to score started a Ray cluster")

    monkeypatch.setattr(ray, "init", no_cluster)
    resumed = run(pool_case, tmp_path / "pooled", "dies_once", workers=2, trials=4)
    assert resumed.evaluated == 0 and comparable(resumed.trials) == comparable(pooled.trials)


def test_a_candidate_that_keeps_killing_workers_ends_in_one_clear_error(pool_case, tmp_path,
                                                                        monkeypatch):
    need("ray")
    from click.testing import CliRunner

    from mergekit_expo.cli import main
    from mergekit_expo.search import ray_pool

    monkeypatch.setattr(ray_pool, "MAX_RESTARTS", 1)  # two dead workers are enough here
    result = CliRunner().invoke(main, [
        "search", str(pool_case["config"]), str(tmp_path / "out"), "--alpha", "0.3",
        "--prompts", str(pool_case["prompts"]), "--engine", "hf", "--no-progress",
        "--scorer", f"{pool_case['scorer']}:always_dies", "--max-new-tokens", "2",
        "--workers", "2"])
    assert result.exit_code == 1
    assert "Error: α = 0.3, λ = 0 ended 2 Ray workers in turn" in result.output
    assert "the same command resumes from there" in result.output
    assert "Traceback" not in result.output
    import ray

    assert not ray.is_initialized()  # the run's cluster is shut down after the failure


def test_trials_proposed_n_at_a_time_depend_on_n_and_the_seed_only():
    """No Ray needed: the study asks N trials, has them scored together and tells the results
    in trial order, so the proposals repeat for the same N and seed whoever finishes first."""
    from mergekit_expo.search.trials import TrialSpace, run_trials

    space = TrialSpace(groups=("attention", "mlp"), alpha=(0.0, 1.0), lam=None, step=0.05)
    grid = [{"alpha": a, "lambda": 0.0, "mean": -a} for a in (0.1, 0.5, 0.9)]

    def study(parallel, reverse):
        batches = []

        def evaluate(jobs):  # scores the batch last to first when reverse: finishing order
            batches.append([number for _, number in jobs])
            done = {number: {"groups": values, "trial": number,
                             "mean": -abs(values["attention"][0] - 0.3) - values["mlp"][0]}
                    for values, number in (reversed(jobs) if reverse else jobs)}
            return [done[number] for _, number in jobs]

        rows = run_trials(space, trials=6, seed=1, grid_rows=grid, finished=[],
                          lookup=lambda values: None, evaluate=evaluate, parallel=parallel)
        return [r["groups"] for r in rows], batches

    values, batches = study(2, reverse=False)
    assert batches == [[0, 1], [2, 3], [4, 5]]
    assert study(2, reverse=True) == (values, batches)
    assert all(values[k] != values[k + 1] for k in (0, 2, 4))  # two pending trials differ
    serial, one_by_one = study(1, reverse=False)
    assert one_by_one == [[k] for k in range(6)]
