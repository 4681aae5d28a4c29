"""What is compared: one entry per table row, each run as its own process.

ExPO on (θ₀ = ``sft``, θ₁ = the last iterate):
  floor            read both inputs' bytes, write and fsync the output's bytes
  expo             ``mergekit-yaml`` with ``merge_method: expo``
  task_arithmetic  ``mergekit-yaml`` with ``task_arithmetic``, weight 1+α (same inputs, same flags)
  inram            both models in RAM with transformers, as in the paper's released script
  expo_lowmem      ``expo`` with the flags docs/performance.md recommends for low memory
  ta_lowmem        ``task_arithmetic`` with the same flags
  ta_fp32          ``task_arithmetic`` with ``dtype: float32`` (what a user adds for accuracy)
(λ, α) merge on θ₀ and T iterates:
  lam_floor        read the T+1 inputs, write and fsync one output
  lam_onepass      ``mergekit-yaml``, ``expo`` with ``lambda``: one pass over the T checkpoints
  lam_twostep      ``mergekit-multi``: ``linear`` average to disk, then ``expo`` on it
Flag sweep (``--flag-sweep``): ``expo`` with one mergekit option changed per row.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SCRIPTS = Path(__file__).resolve().parent / "scripts"
LOW_MEMORY_FLAGS = ("--out-shard-size", "500M")
FLAG_SWEEP = {
    "expo_async": ("--async-write",),
    "expo_lazy_unpickle": ("--lazy-unpickle",),
    "expo_low_cpu_memory": ("--low-cpu-memory",),
    "expo_threads1": ("--num-threads", "1"),
    "expo_shard1B": ("--out-shard-size", "1B"),
    "expo_shard200M": ("--out-shard-size", "200M"),
    "expo_shard500M_async": ("--out-shard-size", "500M", "--async-write"),
}


@dataclass
class Models:
    sft: Path
    iterates: list[Path]

    @property
    def final(self) -> Path:
        return self.iterates[-1]


@dataclass
class Row:
    key: str
    label: str
    group: str  # "expo" (two inputs) or "lambda" (T + 1 inputs)
    command: list[str]
    output: Path
    check: dict | None = None  # arguments of verify.check_output, or None for the floor rows
    flags: tuple[str, ...] = ()
    notes: str = ""
    configs: dict[str, str] = field(default_factory=dict)
    scratch: list[Path] = field(default_factory=list)  # removed with the output
    inputs: list[Path] = field(default_factory=list)  # read into the page cache before the run

    @property
    def paths(self) -> list[Path]:
        return [self.output, *self.scratch]


def tool(name: str) -> str:
    """A console script of the running interpreter's environment (``mergekit-yaml`` …)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _dump(path: Path, documents: list[dict]) -> str:
    text = yaml.safe_dump_all(documents, sort_keys=False)
    path.write_text(text)
    return text


def build_rows(
    models: Models,
    work: Path,
    *,
    alpha: float,
    lam: float,
    flags: tuple[str, ...] = (),
    low_memory_flags: tuple[str, ...] = LOW_MEMORY_FLAGS,
    include: set[str] | None = None,
    flag_sweep: bool = False,
    extras: bool = True,
) -> list[Row]:
    """All rows for one model size; configs are written under ``work / "configs"``."""
    configs = work / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    sft, final = str(models.sft.resolve()), str(models.final.resolve())
    between = [str(p.resolve()) for p in models.iterates[:-1]]
    python, yaml_tool, multi_tool = sys.executable, tool("mergekit-yaml"), tool("mergekit-multi")

    expo = {
        "merge_method": "expo",
        "base_model": sft,
        "models": [{"model": final}],
        "parameters": {"alpha": alpha},
    }
    task_arithmetic = {
        "merge_method": "task_arithmetic",
        "base_model": sft,
        "models": [{"model": final, "parameters": {"weight": 1 + alpha}}],
    }
    texts = {
        "expo.yml": _dump(configs / "expo.yml", [expo]),
        "task_arithmetic.yml": _dump(configs / "task_arithmetic.yml", [task_arithmetic]),
        "task_arithmetic_fp32.yml": _dump(
            configs / "task_arithmetic_fp32.yml",
            [{**task_arithmetic, "dtype": "float32", "out_dtype": "bfloat16"}],
        ),
    }
    expo_check = {"reference": models.sft, "final": models.final, "alpha": alpha, "lam": 0.0}

    def merge(key, label, config, extra=(), notes=""):
        all_flags = (*flags, *extra)
        return Row(
            key,
            label,
            "expo",
            [yaml_tool, str(configs / config), str(out / key), *all_flags],
            out / key,
            expo_check,
            all_flags,
            notes,
        )

    rows = [
        Row(
            "floor",
            "I/O floor (read 2 inputs, write + fsync 1 output)",
            "expo",
            [python, str(SCRIPTS / "floor.py"), str(out / "floor"), "--read", sft,
             "--read", final, "--write-like", final],
            out / "floor",
            notes="fsync is inside the wall time",
        ),
        merge("expo", "expo (mergekit-yaml)", "expo.yml"),
        merge("task_arithmetic", "task_arithmetic, weight 1+α (mergekit-yaml)",
              "task_arithmetic.yml"),
        Row(
            "inram",
            "two models in RAM (transformers, paper's script)",
            "expo",
            [python, str(SCRIPTS / "inram.py"), sft, final, str(out / "inram"),
             "--alpha", repr(alpha)],
            out / "inram",
            expo_check,
        ),
        merge("expo_lowmem", f"expo {' '.join(low_memory_flags)}", "expo.yml",
              low_memory_flags, "recommended low-memory flags"),
    ]
    if extras:
        rows += [
            merge("ta_lowmem", f"task_arithmetic {' '.join(low_memory_flags)}",
                  "task_arithmetic.yml", low_memory_flags),
            merge("ta_fp32", "task_arithmetic with dtype: float32", "task_arithmetic_fp32.yml",
                  notes="accuracy variant"),
        ]
    if flag_sweep:
        for key, extra in FLAG_SWEEP.items():
            rows.append(merge(key, f"expo {' '.join(extra)}", "expo.yml", extra, "flag sweep"))

    if between:
        count = len(between)
        one_pass = {
            "merge_method": "expo",
            "base_model": sft,
            "models": [{"model": m} for m in (*between, final)],
            "parameters": {"alpha": alpha, "lambda": lam},
        }
        average = {
            "name": "average",
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": lam / count}} for m in between]
            + [{"model": final, "parameters": {"weight": 1 - lam}}],
        }
        second = {
            "merge_method": "expo",
            "base_model": sft,
            "models": [{"model": "average"}],
            "parameters": {"alpha": alpha},
        }
        texts["lambda_onepass.yml"] = _dump(configs / "lambda_onepass.yml", [one_pass])
        texts["lambda_twostep.yml"] = _dump(configs / "lambda_twostep.yml", [average, second])
        lam_check = {
            "reference": models.sft,
            "final": models.final,
            "intermediates": [Path(p) for p in between],
            "alpha": alpha,
            "lam": lam,
        }
        rows += [
            Row(
                "lam_floor",
                f"I/O floor (read {count + 2} inputs, write + fsync 1 output)",
                "lambda",
                [python, str(SCRIPTS / "floor.py"), str(out / "lam_floor"), "--read", sft,
                 *[a for m in (*between, final) for a in ("--read", m)], "--write-like", final],
                out / "lam_floor",
            ),
            Row(
                "lam_onepass",
                f"(λ, α) in one pass, expo (mergekit-yaml, T = {count + 1})",
                "lambda",
                [yaml_tool, str(configs / "lambda_onepass.yml"), str(out / "lam_onepass"),
                 *flags],
                out / "lam_onepass",
                lam_check,
                flags,
            ),
            Row(
                "lam_twostep",
                "(λ, α) two steps: linear, then expo (mergekit-multi)",
                "lambda",
                [multi_tool, str(configs / "lambda_twostep.yml"), "--intermediate-dir",
                 str(out / "lam_twostep_intermediate"), "--out-path",
                 str(out / "lam_twostep"), *flags],
                out / "lam_twostep",
                lam_check,
                flags,
                notes="bf16 intermediate on disk",
                scratch=[out / "lam_twostep_intermediate"],
            ),
        ]
    for row in rows:
        row.configs = texts
        row.inputs = [models.sft, models.final] if row.group == "expo" else [
            models.sft, *models.iterates
        ]
    if include is not None:
        rows = [row for row in rows if row.key in include]
    return rows
