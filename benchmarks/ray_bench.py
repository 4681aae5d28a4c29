"""Benchmark: candidates per minute of ``mergekit-expo search`` serially and with 1 and 2 Ray
workers (``--workers``), on the same small model, prompts and grid; the rows must agree.

Each run is a fresh search (``run_search``) in its own output folder, timed from start to
finish, so a Ray run pays for starting Ray and one model per actor. With 2 workers on a
machine of 2 cores this checks correctness (same rows as the serial run) more than it measures
a speed-up: the actors share the cores the serial run had to itself.

    python benchmarks/ray_bench.py --workdir /tmp/ray-bench
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import click  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.search_bench import PROMPT_STEMS  # noqa: E402

SCORER = "def score(prompt, response):\n    return float(len(set(response.split())))\n"
VARYING = {"seconds", "update_seconds", "settings", "key"}


def inputs(work: Path, hidden: int, layers: int, prompt_count: int) -> tuple[Path, Path, Path]:
    from mergekit_expo.demo.checkpoints import build_model, build_tokenizer, derive

    sft, dpo = work / "sft", work / "dpo"
    if not (sft / "config.json").exists():
        build_model(sft, hidden=hidden, layers=layers, heads=max(1, hidden // 64),
                    tokenizer=build_tokenizer())
    if not (dpo / "config.json").exists():
        derive(sft, dpo, seed=1, scale=0.02)
    config = work / "expo.yml"
    config.write_text(yaml.safe_dump({"merge_method": "expo", "base_model": str(sft),
                                      "models": [{"model": str(dpo)}]}))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": f"{PROMPT_STEMS[i % len(PROMPT_STEMS)]} ({i})"}) + "\n"
        for i in range(prompt_count)))
    scorer = work / "bench_scorer.py"
    scorer.write_text(SCORER)
    return config, prompts, scorer


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--hidden", type=int, default=256, show_default=True)
@click.option("--layers", type=int, default=4, show_default=True)
@click.option("--candidates", type=int, default=6, show_default=True)
@click.option("--prompts", "prompt_count", type=int, default=16, show_default=True)
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(workdir, hidden, layers, candidates, prompt_count, max_new_tokens, json_out):
    """Candidates per minute: serial, 1 Ray worker, 2 Ray workers (rows checked equal)."""
    from mergekit_expo.search.run import run_search
    from mergekit_expo.search.settings import SearchSettings

    workdir.mkdir(parents=True, exist_ok=True)
    config, prompts, scorer = inputs(workdir, hidden, layers, prompt_count)
    runs = {"serial": {}, "ray, 1 worker": {"workers": 1, "ray_address": "local"},
            "ray, 2 workers": {"workers": 2}}
    report, reference = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "runs": {}}, None
    for name, extra in runs.items():
        out = workdir / "out" / name.replace(", ", "-").replace(" ", "")
        for old in sorted(out.glob("*"), reverse=True):
            old.unlink()
        settings = SearchSettings.model_validate({
            "config": config, "out_dir": out, "prompts": prompts, "progress": False,
            "alphas": [round(0.1 * (k + 1), 10) for k in range(candidates)], "engine": "hf",
            "scorer": {"kind": "callable", "function": f"{scorer}:score"},
            "sampling": {"max_new_tokens": max_new_tokens, "batch_size": 16}, **extra})
        started = time.perf_counter()
        result = run_search(settings)
        wall = time.perf_counter() - started
        rows = [{k: v for k, v in r.items() if k not in VARYING} for r in result.rows]
        reference = reference or rows
        same = rows == reference
        report["runs"][name] = {"seconds": wall, "per_minute": 60 * candidates / wall,
                                "rows_equal_serial": same}
        click.echo(f"{name}: {candidates} candidates in {wall:.1f} s, "
                   f"{60 * candidates / wall:.1f} per minute, rows equal to serial: {same}")
        if not same:
            raise click.ClickException(f"{name}: rows differ from the serial run")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
