"""``--workers``: a local Ray cluster on the CPU scores the same rows as a serial run, and a
worker that dies is replaced and its candidate scored again."""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import write_config
from engines import need

from mergekit_expo.search.run import run_search
from mergekit_expo.search.settings import SearchSettings

PROMPTS = ["The assistant answers the question", "A helpful answer is", "Numbers 0 1 2 3"]
TIMING = {"seconds", "update_seconds", "settings", "key"}  # key: the scorer's name differs


@pytest.fixture(scope="module")
def pool_case(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    sft = zoo.base("pool_sft", hidden=64, seed=8)
    final = zoo.relative("pool_final", sft, seed=80, scale=0.03)
    config = write_config(root / "c.yml", {"merge_method": "expo", "base_model": str(sft),
                                           "models": [{"model": str(final)}]})
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    scorer = root / "pool_scorer.py"
    scorer.write_text(textwrap.dedent(f"""
        import os

        def score(prompt, response):
            return float(len(set(response.split()))) - 0.01 * len(response)

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


def test_two_ray_workers_give_the_serial_rows_and_survive_a_dead_worker(pool_case, tmp_path):
    need("ray")
    serial = run(pool_case, tmp_path / "serial", "score")
    pooled = run(pool_case, tmp_path / "pooled", "dies_once", workers=2)
    assert (pool_case["root"] / "died").exists()  # a worker really died on the way
    assert comparable(pooled.rows) == comparable(serial.rows)
    assert comparable(pooled.trials) == comparable(serial.trials)
    assert pooled.winner["alpha"] == serial.winner["alpha"]
    lines = (tmp_path / "pooled" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 + 2  # each candidate once, written by the driver
