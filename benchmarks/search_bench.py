"""Benchmark: the α search (`mergekit-expo search`) vs doing it by hand, K candidates.

By hand, per candidate: a `mergekit-yaml` merge written to disk (subprocess, as a user runs it),
a transformers load of the result, and the same scoring. The search: one `mergekit-expo search`
subprocess for all K candidates. Both sides sample with the same seed and score with the same
code (a tiny local reward model by default), so the scores must agree exactly; the benchmark
checks that before it reports a speed-up.

    python benchmarks/search_bench.py --workdir /tmp/search-bench

Everything is built locally (HF_HUB_OFFLINE=1): a small bf16 Llama θ₀, an aligned relative θ₁,
a tiny sequence-classification reward model and a prompts file.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import click  # noqa: E402
import yaml  # noqa: E402

BIN = Path(sys.executable).parent
PROMPT_STEMS = [
    "The assistant answers the question",
    "User: how do I merge two models? Assistant:",
    "A helpful answer is",
    "Alignment moves the weights",
    "Extrapolate along that move",
    "Preference pairs have a prompt,",
    "Numbers 0 1 2 3",
    "User: what is a chosen response? Assistant:",
]


def build_inputs(work: Path, hidden: int, layers: int, prompts: int) -> dict[str, Path]:
    """θ₀, θ₁, a reward model and a prompts file under ``work`` (reused if present)."""
    import torch

    from mergekit_expo.demo.checkpoints import build_model, build_tokenizer, derive

    paths = {
        "sft": work / "models" / "sft",
        "dpo": work / "models" / "dpo",
        "rm": work / "models" / "reward",
        "prompts": work / "prompts.jsonl",
    }
    tokenizer = build_tokenizer()
    if not (paths["sft"] / "config.json").exists():
        build_model(paths["sft"], hidden=hidden, layers=layers, heads=max(4, hidden // 64),
                    tokenizer=tokenizer, dtype=torch.bfloat16)
    if not (paths["dpo"] / "config.json").exists():
        derive(paths["sft"], paths["dpo"], seed=1, scale=0.02)
    if not (paths["rm"] / "config.json").exists():
        build_reward_model(paths["rm"], tokenizer)
    lines = [
        {"prompt": f"{PROMPT_STEMS[i % len(PROMPT_STEMS)]} ({i})"} for i in range(prompts)
    ]
    paths["prompts"].write_text("".join(json.dumps(x) + "\n" for x in lines))
    return paths


def build_reward_model(path: Path, tokenizer) -> Path:
    """A tiny float32 Llama sequence classifier with one output (a reward)."""
    from mergekit_expo.demo.checkpoints import build_reward_model as build

    return build(path, tokenizer, hidden=64, layers=2)


def config_for(paths: dict[str, Path], alpha: float | None = None) -> dict:
    config = {
        "merge_method": "expo",
        "base_model": str(paths["sft"].resolve()),
        "models": [{"model": str(paths["dpo"].resolve())}],
    }
    if alpha is not None:
        config["parameters"] = {"alpha": alpha}
    return config


def run(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        shown = " ".join(map(str, command))
        raise click.ClickException(f"{shown} failed:\n{result.stderr[-3000:]}")
    return seconds


def read_inputs_once(models: list[Path]) -> float:
    """Seconds to read every safetensors byte of ``models`` once (the yardstick of an update)."""
    buffer = memoryview(bytearray(64 << 20))
    started = time.perf_counter()
    for model in models:
        for shard in sorted(model.glob("*.safetensors")):
            with open(shard, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass
    return time.perf_counter() - started


def time_search(paths, work: Path, alphas, sampling: dict) -> tuple[float, list[dict]]:
    out = work / "search"
    shutil.rmtree(out, ignore_errors=True)
    config = work / "search.yml"
    config.write_text(yaml.safe_dump(config_for(paths), sort_keys=False))
    seconds = run([
        BIN / "mergekit-expo", "search", config, out,
        "--alpha", ",".join(str(a) for a in alphas),
        "--prompts", paths["prompts"], "--reward-model", paths["rm"],
        "--max-new-tokens", sampling["max_new_tokens"], "--batch-size", sampling["batch_size"],
        "--seed", sampling["seed"], "--no-progress",
    ])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return seconds, rows


def time_by_hand(
    paths, work: Path, alphas, sampling: dict, *, in_process: bool = False
) -> tuple[dict[str, float], list]:
    """K × (merge to disk + transformers load + the same scoring).

    The merge is a `mergekit-yaml` subprocess per candidate (what the issue calls "by hand"), or
    with ``in_process`` mergekit's ``run_merge`` called in this process (a scripted loop that
    pays mergekit's import once). The reward model is loaded once either way.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_expo.search.generation import Sampler
    from mergekit_expo.search.prompts import read_prompts
    from mergekit_expo.search.scorers import RewardModelScorer
    from mergekit_expo.search.settings import SamplingSettings

    prompts = read_prompts(paths["prompts"])
    settings = SamplingSettings(**sampling)
    scorer = RewardModelScorer(paths["rm"], batch_size=settings.batch_size)  # loaded once
    phases = {"merge": 0.0, "load": 0.0, "score": 0.0}
    results = []
    for alpha in alphas:
        config = work / f"by-hand-{alpha}.yml"
        merged = work / f"by-hand-{alpha}"
        shutil.rmtree(merged, ignore_errors=True)
        config.write_text(yaml.safe_dump(config_for(paths, alpha), sort_keys=False))
        if in_process:
            started = time.perf_counter()
            from mergekit.config import MergeConfiguration
            from mergekit.merge import MergeOptions, run_merge

            run_merge(MergeConfiguration.model_validate(config_for(paths, alpha)), str(merged),
                      options=MergeOptions(quiet=True))
            phases["merge"] += time.perf_counter() - started
        else:
            phases["merge"] += run([BIN / "mergekit-yaml", config, merged])
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval()
        tokenizer = AutoTokenizer.from_pretrained(merged)
        tokenizer.padding_side = "left"
        phases["load"] += time.perf_counter() - started
        started = time.perf_counter()
        responses = Sampler(model, tokenizer, prompts, settings).generate(progress=False)
        scores = scorer.score(prompts, [r.text for r in responses], progress=False)
        phases["score"] += time.perf_counter() - started
        results.append({"alpha": alpha, "mean": scores.mean, "scores": scores.values})
        del model
        shutil.rmtree(merged)
    return phases, results


def time_scripted_loop(paths, work: Path, alphas, sampling: dict) -> tuple[float, list]:
    """A fresh Python process that loops K × (run_merge + load + score): wall time, rows."""
    out = work / "scripted.json"
    command = [sys.executable, Path(__file__).resolve(), "--workdir", work, "--alphas",
               ",".join(map(str, alphas)), "--max-new-tokens", sampling["max_new_tokens"],
               "--batch-size", sampling["batch_size"], "--scripted-loop-to", out]
    seconds = run(command)
    return seconds, json.loads(out.read_text())


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/tmp/mergekit-expo-search-bench"), show_default=True)
@click.option("--hidden", default=512, show_default=True)
@click.option("--layers", default=4, show_default=True)
@click.option("--alphas", default="0.1,0.2,0.3,0.4,0.5", show_default=True, help="K candidates.")
@click.option("--prompts", "prompt_count", default=16, show_default=True)
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--repeat", default=1, show_default=True, help="Interleaved repetitions.")
@click.option("--threads", type=int, help="torch/OpenMP threads on both sides [default: all].")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--scripted-loop-to", type=click.Path(dir_okay=False, path_type=Path), hidden=True)
def main(workdir, hidden, layers, alphas, prompt_count, max_new_tokens, batch_size, repeat,
         threads, json_out, scripted_loop_to):
    """Time K candidates: `mergekit-expo search` vs K × (mergekit-yaml + load + scoring)."""
    import torch
    from safetensors.torch import load_file

    alphas = [float(a) for a in alphas.split(",")]
    if threads:  # on a shared machine, 1 thread is far less noisy than spinning OpenMP threads
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    if scripted_loop_to:  # the child process of time_scripted_loop
        sampling = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": 0}
        paths = {"sft": workdir / "models" / "sft", "dpo": workdir / "models" / "dpo",
                 "rm": workdir / "models" / "reward", "prompts": workdir / "prompts.jsonl"}
        _, rows = time_by_hand(paths, workdir, alphas, sampling, in_process=True)
        scripted_loop_to.write_text(json.dumps(rows))
        return
    load_before = os.getloadavg()[0]
    workdir.mkdir(parents=True, exist_ok=True)
    paths = build_inputs(workdir, hidden, layers, prompt_count)
    sampling = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": 0}
    params = sum(t.numel() for t in load_file(paths["sft"] / "model.safetensors").values())
    click.echo(f"model: {params / 1e6:.1f} M parameters, bf16; K = {len(alphas)}; "
               f"{prompt_count} prompts × {max_new_tokens} new tokens; {torch.get_num_threads()} "
               f"threads on {os.cpu_count()} CPUs")

    runs = []
    for index in range(repeat):  # interleaved, so slow phases of a shared machine hit both sides
        read_once = read_inputs_once([paths["sft"], paths["dpo"]])
        search_seconds, search_rows = time_search(paths, workdir, alphas, sampling)
        phases, hand_rows = time_by_hand(paths, workdir, alphas, sampling)
        loop_seconds, loop_rows = time_scripted_loop(paths, workdir, alphas, sampling)
        same = all(
            s["alpha"] == h["alpha"] == h2["alpha"] and s["scores"] == h["scores"] == h2["scores"]
            for s, h, h2 in zip(search_rows, hand_rows, loop_rows, strict=True)
        )
        by_hand = sum(phases.values())
        updates = [r["update_seconds"] for r in search_rows]
        runs.append({
            "search_seconds": round(search_seconds, 2),
            "search_candidate_seconds": [r["seconds"] for r in search_rows],
            "search_update_seconds": updates,
            "read_inputs_once_seconds": round(read_once, 3),
            "by_hand_seconds": round(by_hand, 2),
            "by_hand_phases": {k: round(v, 2) for k, v in phases.items()},
            "speedup": round(by_hand / search_seconds, 2),
            "scripted_loop_seconds": round(loop_seconds, 2),
            "speedup_vs_scripted_loop": round(loop_seconds / search_seconds, 2),
            "scores_identical": same,
        })
        click.echo(
            f"run {index + 1}: search {search_seconds:.1f} s; by hand {by_hand:.1f} s (merge "
            f"{phases['merge']:.1f} + load {phases['load']:.1f} + score {phases['score']:.1f}); "
            f"speed-up {by_hand / search_seconds:.2f}x; scripted run_merge loop "
            f"{loop_seconds:.1f} s ({loop_seconds / search_seconds:.2f}x); scores identical: {same}"
        )
        click.echo(
            f"  search: weights update per candidate median {statistics.median(updates):.3f} s; "
            f"reading θ₀ and θ₁ once takes {read_once:.3f} s"
        )
    report = {
        "command": " ".join(sys.argv),
        "model_parameters": params,
        "hidden": hidden,
        "layers": layers,
        "k": len(alphas),
        "prompts": prompt_count,
        "max_new_tokens": max_new_tokens,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "median_search_seconds": statistics.median(r["search_seconds"] for r in runs),
        "median_update_seconds": statistics.median(
            u for r in runs for u in r["search_update_seconds"]
        ),
        "median_read_inputs_once_seconds": statistics.median(
            r["read_inputs_once_seconds"] for r in runs
        ),
        "median_by_hand_seconds": statistics.median(r["by_hand_seconds"] for r in runs),
        "median_speedup": statistics.median(r["speedup"] for r in runs),
        "median_scripted_loop_seconds": statistics.median(
            r["scripted_loop_seconds"] for r in runs
        ),
        "median_speedup_vs_scripted_loop": statistics.median(
            r["speedup_vs_scripted_loop"] for r in runs
        ),
        "runs": runs,
    }
    click.echo(json.dumps(report, indent=2))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    if not all(r["scores_identical"] for r in runs):
        raise click.ClickException("search and by-hand scores differ: the comparison is invalid")


if __name__ == "__main__":
    main()
