"""Benchmark: ExPO on a LoRA adapter, the adapter path vs the full merge, for a 1 B-shaped model.

- adapter path: `mergekit-expo lora ADAPTER OUT --alpha A` (writes a few-MB adapter);
- full merge:   `mergekit-yaml` on `base_model: SFT`, `models: [SFT+ADAPTER]`, `merge_method:
  expo` (mergekit merges the adapter into a full θ₁ first, then extrapolates; its LoRA cache is
  emptied before every run, so each run pays for that step as a user's first run does).

Each is its own process (the commands a user types), run in turn (interleaved) `--repeats`
times; the report gives medians of wall time, peak private memory and the output size. The
inputs are synthetic: θ₀ from benchmarks/synthetic.py and a rank-16 float32 adapter on every
linear layer of every block, with a step of ~2 % of each weight's RMS. The benchmark checks
both outputs against the float64 formula on one tensor before it reports.

    python benchmarks/lora_bench.py --params 1.1B --repeats 3
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import click  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.measure import run_measured  # noqa: E402
from benchmarks.synthetic import CheckpointReader, build_family, parse_count, shape_for  # noqa: E402

BIN = Path(sys.executable).parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKED = "model.layers.0.self_attn.q_proj.weight"


def build_adapter(sft: Path, out: Path, rank: int, step: float = 0.02) -> Path:
    """A PEFT LoRA adapter over ``sft``: ‖s·BA‖ ≈ ``step`` × the weight's RMS per element."""
    if (out / "adapter_model.safetensors").exists():
        return out
    from safetensors.torch import save_file

    reader = CheckpointReader(sft)
    tensors = {}
    generator = torch.Generator().manual_seed(0)
    lora_alpha = 2 * rank
    scaling = lora_alpha / rank
    for name in reader.names():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        weight = reader.get(name)
        rows, cols = weight.shape
        rms = float(weight.float().pow(2).mean().sqrt())
        a = torch.randn(rank, cols, generator=generator) / math.sqrt(cols)
        # (s·BA)_ij has variance s²·rank·σ_B²·(1/cols)·cols·… ≈ s²·rank·σ_B²
        b = torch.randn(rows, rank, generator=generator) * (step * rms / (scaling * rank ** 0.5))
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": lora_alpha,
        "target_modules": TARGETS, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "base_model_name_or_path": str(sft),
        "inference_mode": True, "modules_to_save": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def scaling(adapter: Path, module: str) -> float:
    """PEFT's scaling of ``module`` from the adapter's adapter_config.json (the package's
    :func:`module_scaling`, without reading the config through PEFT: seconds of CPU)."""
    from mergekit_expo.lora.adapter import module_scaling

    config = json.loads((adapter / "adapter_config.json").read_text())
    return module_scaling(config, module)[1]


def low_rank_update(adapter: Path, module: str) -> torch.Tensor:
    """B @ A of one module of ``adapter``, in float64."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as handle:
        a, b = (handle.get_tensor(f"base_model.model.{module}.lora_{x}.weight").double()
                for x in "AB")
    return b @ a


def check(sft: Path, adapter: Path, lora_out: Path, merged: Path, alpha: float) -> dict:
    """One tensor of each output against θ₀ + (1+α)·s·BA in float64."""
    theta0 = CheckpointReader(sft).get(CHECKED).double()
    module = CHECKED.removesuffix(".weight")
    given, written = scaling(adapter, module), scaling(lora_out, module)
    exact = theta0 + (1 + alpha) * given * low_rank_update(adapter, module)
    ours = theta0 + written * low_rank_update(lora_out, module)  # the adapter's own definition
    full = CheckpointReader(merged).get(CHECKED)
    rounded = exact.to(torch.bfloat16)
    return {
        "tensor": CHECKED,
        "adapter_scaling_over_input": written / given,
        "adapter_differing_elements_after_bf16_rounding": int((ours.to(torch.bfloat16)
                                                               != rounded).sum()),
        "full_merge_differing_elements": int((full != rounded).sum()),
        "elements": rounded.numel(),
    }


@click.command()
@click.option("--params", default="1.1B", show_default=True, help="θ₀'s size (synthetic Llama).")
@click.option("--rank", type=int, default=16, show_default=True)
@click.option("--alpha", type=float, default=0.3, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(__file__).resolve().parent / ".cache" / "lora", show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(params, rank, alpha, repeats, workdir, json_out):
    """Time `mergekit-expo lora` against `mergekit-yaml` with `SFT+ADAPTER`, interleaved."""
    workdir = workdir.resolve()
    shape = shape_for(parse_count(params))
    (sft,) = build_family(workdir / "models", shape, count=0, shard_bytes=int(1e9))
    adapter = build_adapter(sft, workdir / "adapter", rank)
    config = {"merge_method": "expo", "base_model": str(sft),
              "models": [{"model": f"{sft}+{adapter}"}], "parameters": {"alpha": alpha},
              "dtype": "bfloat16"}
    config_path = workdir / "expo-lora.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    runs_dir = workdir / "runs"
    commands = {
        "adapter": [BIN / "mergekit-expo", "lora", adapter, runs_dir / "adapter",
                    "--alpha", str(alpha)],
        "full_merge": [BIN / "mergekit-yaml", config_path, runs_dir / "merged",
                       "--lora-merge-cache", runs_dir / "lora-cache", "--no-copy-tokenizer",
                       "--out-shard-size", "1B"],
    }
    rows: dict[str, list[dict]] = {name: [] for name in commands}
    for index in range(repeats):
        for name, command in commands.items():
            out = command[3] if name == "adapter" else command[2]
            for stale in (out, runs_dir / "lora-cache"):  # every run starts from nothing
                shutil.rmtree(stale, ignore_errors=True)
            measured = run_measured([str(c) for c in command], log=workdir / f"{name}.log")
            if measured.returncode:
                raise click.ClickException(f"{name} failed; see {workdir / f'{name}.log'}")
            rows[name].append({"wall_s": round(measured.wall_s, 2),
                               "cpu_s": round(measured.cpu_s, 2),
                               "background_cores": round(measured.background_cores, 2),
                               "peak_private_gb": round(measured.peak_private_bytes / 1e9, 3),
                               "output_bytes": size(Path(out))})
            click.echo(f"run {index + 1} {name}: {measured.wall_s:.2f} s wall, "
                       f"{measured.peak_private_bytes / 1e9:.2f} GB private, "
                       f"{size(Path(out)) / 1e6:.1f} MB written")
    checked = check(sft, adapter, runs_dir / "adapter", runs_dir / "merged", alpha)
    for big in ("lora-cache", "merged"):  # GBs at 1 B parameters
        shutil.rmtree(runs_dir / big, ignore_errors=True)
    medians = {
        name: {key: statistics.median(r[key] for r in found) for key in found[0]}
        for name, found in rows.items()
    }
    report = {
        "command": " ".join(["python", *sys.argv]),
        "model_parameters": shape.parameters(),
        "adapter_bytes": size(adapter),
        "rank": rank,
        "alpha": alpha,
        "repeats": repeats,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "medians": medians,
        "wall_ratio_full_over_adapter": round(
            medians["full_merge"]["wall_s"] / medians["adapter"]["wall_s"], 1),
        "cpu_ratio_full_over_adapter": round(
            medians["full_merge"]["cpu_s"] / medians["adapter"]["cpu_s"], 1),
        "size_ratio_full_over_adapter": round(
            medians["full_merge"]["output_bytes"] / medians["adapter"]["output_bytes"], 1),
        "check": checked,
        "runs": rows,
    }
    click.echo(json.dumps(report, indent=2))
    titles = {"adapter": "`mergekit-expo lora`", "full_merge": "`mergekit-yaml`, `SFT+ADAPTER`"}
    click.echo(
        "\n| path | wall | CPU | peak private memory | output | other load |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(
            f"| {titles[name]} | {m['wall_s']:.1f} s | {m['cpu_s']:.1f} s | "
            f"{m['peak_private_gb']:.2f} GB | {m['output_bytes'] / 1e6:,.1f} MB | "
            f"{m['background_cores']:.1f} cores |" for name, m in medians.items()
        )
        + f"\n\nmedians of {repeats}; full merge / adapter: wall "
        f"{report['wall_ratio_full_over_adapter']}×, CPU {report['cpu_ratio_full_over_adapter']}×, "
        f"output {report['size_ratio_full_over_adapter']}×; the full merge's "
        f"{CHECKED} differs from the float64 formula rounded once in "
        f"{checked['full_merge_differing_elements'] / checked['elements']:.1%} of its elements, "
        f"the adapter's in {checked['adapter_differing_elements_after_bf16_rounding']}"
    )
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    if checked["adapter_differing_elements_after_bf16_rounding"]:
        raise click.ClickException("the adapter's update is not the float64 formula")


if __name__ == "__main__":
    main()
