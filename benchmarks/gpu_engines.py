"""GPU benchmark of the search's engines: bit-identity on CUDA, update and generation, 1 B, 7 B.

For each shape (synthetic Llama checkpoints θ₀ and θ₁, benchmarks/synthetic.py):

1. ``--engine vllm`` on CUDA: a candidate (α = 0.3) streamed into the engine, read back through
   the worker extension (fused projections split) and compared tensor by tensor with what
   ``mergekit-yaml`` writes for the same α (the first shape only: the merge is written to disk);
2. per candidate, seconds to set the weights and to generate ``--prompts`` × ``--max-new-tokens``
   with transformers on the GPU (inputs resident when they fit) and with vLLM, one engine after
   the other (both at once would not fit a 7 B pair on one GPU), and candidates per minute.

    python benchmarks/gpu_engines.py --workdir /data/gpu-bench --params 1B --params 7B

``--dry-run`` needs no GPU: it prints the plan (shapes, bytes, memory per GPU for each engine,
the commands) and runs the CPU half of the pipeline on a tiny shape (checkpoints built, a
candidate computed by the merge's kernel), so the script is known to work before a GPU is
rented.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import click  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.search_bench import PROMPT_STEMS  # noqa: E402
from benchmarks.synthetic import TINY, build_family, parse_count, shape_for  # noqa: E402

GIB = 1 << 30


def plan(shape) -> dict:
    """Bytes (bf16) and the GPU memory each engine needs for an ExPO pair of this shape."""
    model = shape.parameters() * 2
    return {"parameters": shape.parameters(), "layers": shape.layers, "hidden": shape.hidden,
            "model_gib": model / GIB,
            # transformers: the model + θ₀ and θ₁ resident (else streamed from the host)
            "hf_gib": 3 * model / GIB,
            # vLLM: the model + the KV cache it is given (gpu_memory_utilization)
            "vllm_gib": model / GIB}


def family(workdir: Path, shape) -> Path:
    sft, it1 = build_family(workdir, shape, count=1, shard_bytes=2 * GIB)
    config = sft.parent / "expo.yml"
    config.write_text(yaml.safe_dump({"merge_method": "expo", "base_model": str(sft),
                                      "models": [{"model": str(it1)}]}))
    return config


def time_engine(name: str, weights, sampler, alphas) -> dict:
    rows = []
    for alpha in alphas:
        started = time.perf_counter()
        weights.apply(alpha, 0.0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        update = time.perf_counter() - started
        started = time.perf_counter()
        sampler.generate(progress=False)
        rows.append({"update": update, "generate": time.perf_counter() - started})
    median = {k: statistics.median(r[k] for r in rows) for k in ("update", "generate")}
    median["per_minute"] = 60 / (median["update"] + median["generate"])
    click.echo(f"  {name}: update {median['update']:.2f} s, generate {median['generate']:.2f} s, "
               f"{median['per_minute']:.2f} candidates per minute")
    return {"rows": rows, "median": median}


def bit_identity(config: Path, weights, workdir: Path, alpha: float) -> int:
    """Tensors compared; raises on the first one that differs from ``mergekit-yaml``'s."""
    from safetensors import safe_open

    merged = workdir / "merged"
    best = workdir / "best.yml"
    best.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()),
                                    "parameters": {"alpha": alpha}}))
    subprocess.run([str(Path(sys.executable).with_name("mergekit-yaml")), str(best),
                    str(merged), "--no-copy-tokenizer"], check=True)
    weights.apply(alpha, 0.0)
    held, count = weights.model.read(), 0
    for path in sorted(merged.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                if not torch.equal(held[name], handle.get_tensor(name)):
                    raise AssertionError(f"{name}: the engine's tensor differs from the merge's")
                count += 1
    return count


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--params", "sizes", multiple=True, default=("1B", "7B"), show_default=True,
              help="Model sizes (repeatable): 1B, 7B, 300M …")
@click.option("--prompts", "prompt_count", type=int, default=256, show_default=True)
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True, help="Candidates per engine.")
@click.option("--gpu-memory-utilization", type=float, default=0.85, show_default=True)
@click.option("--dry-run", is_flag=True, help="No GPU: print the plan, run the CPU half tiny.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(workdir, sizes, prompt_count, max_new_tokens, batch_size, repeat,
         gpu_memory_utilization, dry_run, json_out):
    """hf vs vLLM on one GPU: bit-identity, update and generation seconds, candidates/minute."""
    from mergekit_expo.search.settings import SamplingSettings

    shapes = {size: shape_for(parse_count(size)) for size in sizes}
    report: dict = {"command": " ".join(sys.argv), "shapes": {}}
    for size, shape in shapes.items():
        report["shapes"][size] = plan(shape)
        p = report["shapes"][size]
        click.echo(f"{size}: {p['parameters'] / 1e9:.2f} B parameters ({p['layers']} layers, "
                   f"hidden {p['hidden']}), {p['model_gib']:.1f} GiB bf16; GPU memory: hf "
                   f"≈ {p['hf_gib']:.1f} GiB with inputs resident, vLLM ≈ {p['vllm_gib']:.1f} "
                   f"GiB + KV cache (gpu_memory_utilization {gpu_memory_utilization})")
    workdir.mkdir(parents=True, exist_ok=True)
    if dry_run:
        from mergekit_expo.search.candidates import CandidateWeights
        from mergekit_expo.search.merge_config import load_search_config

        weights = CandidateWeights(load_search_config(family(workdir, TINY)), progress=False)
        weights.apply(0.3, 0.0)
        click.echo(f"dry run: {len(weights.targets)} tensors of a tiny synthetic pair computed "
                   "by the merge's kernel on the CPU; on a GPU the same command without "
                   "--dry-run measures the plan above")
        if json_out:
            json_out.write_text(json.dumps(report, indent=1))
        return
    if not torch.cuda.is_available():
        raise click.ClickException("no CUDA device: run on a GPU machine, or pass --dry-run")
    from mergekit_expo.search.candidates import CandidateWeights
    from mergekit_expo.search.generation import Sampler, load_tokenizer
    from mergekit_expo.search.merge_config import load_search_config
    from mergekit_expo.search.vllm_engine import EngineWeights, VllmSampler

    prompts = [f"{PROMPT_STEMS[i % len(PROMPT_STEMS)]} ({i})" for i in range(prompt_count)]
    sampling = SamplingSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    alphas = [0.1 * (k + 1) for k in range(repeat)]
    for index, (size, shape) in enumerate(shapes.items()):
        config = family(workdir, shape)
        search = load_search_config(config)
        tokenizer = load_tokenizer(search, side="left")
        entry = report["shapes"][size]
        click.echo(f"{size}:")
        hf = CandidateWeights(search, device="cuda", progress=False)
        entry["hf"] = time_engine("hf", hf, Sampler(hf.model, tokenizer, prompts, sampling),
                                  alphas)
        del hf
        torch.cuda.empty_cache()
        engine = EngineWeights(search, progress=False, engine_options={
            "gpu_memory_utilization": gpu_memory_utilization})
        entry["vllm"] = time_engine("vllm", engine, VllmSampler(engine.model, tokenizer,
                                                                prompts, sampling), alphas)
        entry["vllm_over_hf_per_minute"] = (entry["vllm"]["median"]["per_minute"]
                                            / entry["hf"]["median"]["per_minute"])
        if index == 0:
            entry["bit_identical_tensors"] = bit_identity(config, engine, workdir / size, 0.3)
            click.echo(f"  bit-identical on CUDA: {entry['bit_identical_tensors']} tensors")
        engine.model.close()
        click.echo(f"  vllm / hf candidates per minute: {entry['vllm_over_hf_per_minute']:.2f}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
