"""Evaluation of the toy run with the project's own tools.

* ``mergekit-expo search`` picks α (and λ) on the *dev* prompts with the gold reward as scorer
  (``--scorer toy_task:gold_reward``), and records reward and length for every α;
* ``mergekit-yaml`` merges each winner (``best.yml``) into a real checkpoint;
* every checkpoint and merged model is then scored on separate *test* prompts (seeded sampling,
  same decoding as the search), so the reported numbers are not the ones α was selected on;
* the implicit reward r = β·(log π_α(y|x) − log π_ref(y|x)), π_ref = θ₀, is computed for the
  completions the search sampled from each π_α, and correlated with α.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import toy_task
import toy_train
import yaml
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


@dataclass
class EvalSettings:
    """Grids, prompt counts and decoding of the evaluation (``--smoke`` shrinks them)."""

    dev_repeats: int = 8  # samples per dev prompt (32 prompts)
    test_repeats: int = 16  # samples per test prompt (32 prompts)
    dpo_alphas: str = "0:4:0.25"
    iter_alphas: str = "0:2:0.25"
    iter_lambdas: str = "0,0.25,0.5,0.75"
    # decoding: plain sampling from π (no temperature/top-p/top-k reshaping, see the docs)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    search_seed: int = 1234
    test_seed: int = 4321
    batch_size: int = 256


SMOKE_EVAL = {"dev_repeats": 1, "test_repeats": 1, "dpo_alphas": "0,0.5", "iter_alphas": "0,0.5",
              "iter_lambdas": "0,0.5"}


def environment() -> dict[str, str]:
    """Subprocess environment: offline, and toy_task importable for the search's scorer."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def write_prompts(out: Path, settings: toy_train.Settings, ev: EvalSettings) -> dict[str, Path]:
    """dev.jsonl and test.jsonl: the held-out prompts split in two, each repeated."""
    _, held_out = toy_task.split_prompts(settings.seed)
    dev, test = held_out[0::2], held_out[1::2]
    files = {}
    for name, prompts, repeats in (("dev", dev, ev.dev_repeats), ("test", test, ev.test_repeats)):
        path = out / f"{name}_prompts.jsonl"
        lines = [json.dumps({"prompt": p}) for p in prompts for _ in range(repeats)]
        path.write_text("\n".join(lines) + "\n")
        files[name] = path
    return files


def write_config(
    path: Path, reference: Path, models: Sequence[Path], *, alpha: float = 0.0, lam: float = 0.0
) -> Path:
    """An ``expo`` config: θ₀ = reference, models = intermediates then the final one."""
    config = {
        "merge_method": "expo",
        "base_model": str(reference.resolve()),
        "models": [{"model": str(m.resolve())} for m in models],
        "parameters": {"alpha": alpha, "lambda": lam},
        "dtype": "float32",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_search(
    config: Path, out_dir: Path, prompts: Path, ev: EvalSettings, *, alphas: str,
    lambdas: str | None = None, extra: Sequence[str] = (),
) -> list[dict]:
    """``mergekit-expo search`` with the gold reward (``extra``: more options); returns the
    rows of results.jsonl."""
    command = [
        str(BIN / "mergekit-expo"), "search", str(config), str(out_dir),
        "--alpha", alphas,
        "--prompts", str(prompts),
        "--scorer", "toy_task:gold_reward",
        "--temperature", str(ev.temperature), "--top-p", str(ev.top_p), "--top-k", str(ev.top_k),
        "--max-new-tokens", str(toy_task.MAX_NEW_TOKENS),
        "--seed", str(ev.search_seed),
        "--batch-size", str(ev.batch_size),
        "--save-responses", "--no-progress",
    ]
    if lambdas is not None:
        command += ["--lambda", lambdas]
    command += list(extra)
    _run(command, out_dir / "search.log")
    return _rows(out_dir)


def mergekit_yaml(config: Path, out: Path) -> Path:
    """The real ``mergekit-yaml`` on a config (absolute paths), in a subprocess."""
    _run([str(BIN / "mergekit-yaml"), str(config), str(out), "--quiet"], out.with_suffix(".log"))
    return out


def _run(command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        result = subprocess.run(
            command, stdout=handle, stderr=subprocess.STDOUT, env=environment(), check=False
        )
    if result.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{command[0]} failed (exit {result.returncode}); log {log}:\n{tail}")


# -- scoring fixed models on the test prompts ----------------------------------------------


@dataclass
class Measured:
    """Gold reward (mean ± s.e.), mean length, and where the reward comes from."""

    mean: float
    sem: float
    length: float
    n: int
    on_topic: float  # mean on-topic words per answer (+1 each)
    bad: float  # mean bad words per answer (−2 each)
    over_length: float  # share of answers longer than 12 words (−1.5 per extra word)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def read_prompt_file(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def measure(model_dir: Path, prompts: Sequence[str], ev: EvalSettings) -> Measured:
    """Sample one completion per prompt line from the model and score it with the gold reward."""
    model, tokenizer = toy_train.load(model_dir)
    completions = toy_train.sample(
        model, tokenizer, prompts, seed=ev.test_seed, temperature=ev.temperature,
        batch=ev.batch_size,
    )
    scored = toy_task.score_many(prompts, completions)
    rewards = [s.reward for s in scored]
    return Measured(
        mean=statistics.fmean(rewards),
        sem=statistics.stdev(rewards) / math.sqrt(len(rewards)) if len(rewards) > 1 else 0.0,
        length=statistics.fmean(s.length for s in scored),
        n=len(rewards),
        on_topic=statistics.fmean(s.on_topic for s in scored),
        bad=statistics.fmean(s.bad for s in scored),
        over_length=statistics.fmean(s.length > toy_task.TARGET_LENGTH for s in scored),
    )


def weight_geometry(reference: Path, models: dict[str, Path], target: str) -> dict[str, dict]:
    """‖θ − θ₀‖ relative to ‖θ_target − θ₀‖ and cos(θ − θ₀, θ_target − θ₀), all weights flat."""
    base = state(reference)
    deltas = {
        name: torch.cat([(v.double() - base[k].double()).flatten() for k, v in state(p).items()])
        for name, p in models.items()
    }
    goal = deltas[target]
    return {
        name: {
            "norm_ratio": float(delta.norm() / goal.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(delta, goal, dim=0)),
            "relative_to_theta0": float(delta.norm() / torch.cat(
                [v.double().flatten() for v in base.values()]).norm()),
        }
        for name, delta in deltas.items()
    }


# -- implicit reward -----------------------------------------------------------------------


def state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The float32 state dict of a checkpoint."""
    model, _ = toy_train.load(model_dir)
    return {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def sequence_log_probs(model, tokenizer, prompts: Sequence[str], responses: Sequence[str]):
    """Σ_t log π(y_t | x, y_<t) over the response words and the closing ``</s>``, per item.

    ``</s>`` is counted when the response ended by itself (fewer than the cap of words).
    """
    totals = []
    for start in range(0, len(prompts), 256):
        rows = []
        chunk = zip(prompts[start : start + 256], responses[start : start + 256], strict=True)
        for prompt, response in chunk:
            prompt_ids = tokenizer(prompt)["input_ids"]
            words = toy_task.response_words(response)
            ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"] if words else []
            if len(ids) < toy_task.MAX_NEW_TOKENS:
                ids = ids + [tokenizer.eos_token_id]
            rows.append((prompt_ids + ids, len(prompt_ids)))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        attention = torch.zeros_like(input_ids)
        mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        for i, (ids, begin) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            mask[i, begin - 1 : len(ids) - 1] = True
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].double()
        token = logits.log_softmax(-1).gather(2, input_ids[:, 1:, None])[..., 0]
        totals.append((token * mask).sum(-1))
    return torch.cat(totals)


def implicit_rewards(
    reference_dir: Path,
    final_dir: Path,
    intermediate_dirs: Sequence[Path],
    rows: Sequence[dict],
    prompts: Sequence[str],
    beta: float,
    fixed_responses: Sequence[str],
) -> list[dict]:
    """Mean β·log π_α/π_ref per α on (a) the completions sampled from π_α by the search and
    (b) one fixed set of completions (those sampled at α = 0), π_α built with the merge kernel.
    """
    from mergekit_expo.merge.formula import extrapolate

    model, tokenizer = toy_train.load(final_dir)
    reference_state = state(reference_dir)
    final_state = state(final_dir)
    mids = [state(d) for d in intermediate_dirs]
    model.load_state_dict(reference_state)
    ref_own = sequence_log_probs(model, tokenizer, prompts, fixed_responses)
    results = []
    for row in tqdm(rows, desc="implicit reward", leave=False):
        alpha, lam = row["alpha"], row["lambda"]
        responses = row["responses"]
        model.load_state_dict(reference_state)
        ref_sampled = sequence_log_probs(model, tokenizer, prompts, responses)
        merged = {
            k: extrapolate(
                reference_state[k], final_state[k], [m[k] for m in mids] if lam else (),
                alpha=alpha, lam=lam,
            )
            for k in final_state
        }
        model.load_state_dict(merged)
        policy_sampled = sequence_log_probs(model, tokenizer, prompts, responses)
        policy_fixed = sequence_log_probs(model, tokenizer, prompts, fixed_responses)
        on_policy = beta * (policy_sampled - ref_sampled)
        fixed = beta * (policy_fixed - ref_own)
        results.append(
            {
                "alpha": alpha,
                "lambda": lam,
                "implicit_reward_on_policy": float(on_policy.mean()),
                "implicit_reward_fixed": float(fixed.mean()),
                "gold_reward": row["mean"],
                "length": row["mean_length_tokens"],
            }
        )
    return results


def implicit_summary(points: list[dict]) -> dict:
    """Pearson's r of the mean implicit reward with α (whole grid, α ≤ 1, up to the gold peak)
    and with the gold reward."""
    peak = max(points, key=lambda p: p["gold_reward"])["alpha"]

    def r(key: str, keep, against: str = "alpha") -> float:
        chosen = [p for p in points if keep(p)]
        if len(chosen) < 3:
            return float("nan")
        return pearson([p[against] for p in chosen], [p[key] for p in chosen])

    on, fixed = "implicit_reward_on_policy", "implicit_reward_fixed"
    return {
        "points": points,
        "gold_peak_alpha": peak,
        "pearson_on_policy": r(on, lambda p: True),
        "pearson_fixed": r(fixed, lambda p: True),
        "pearson_on_policy_alpha_le_1": r(on, lambda p: p["alpha"] <= 1),
        "pearson_on_policy_to_peak": r(on, lambda p: p["alpha"] <= peak),
        "pearson_on_policy_vs_gold": r(on, lambda p: True, against="gold_reward"),
    }


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's r (nan if either side is constant)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else float("nan")


def max_weight_difference(merged_dir: Path, expected: dict[str, torch.Tensor]) -> float:
    """max |merged − expected| over every tensor (mergekit's output vs the in-process kernel)."""
    merged = state(merged_dir)
    return max(float((merged[k] - expected[k]).abs().max()) for k in expected)


# -- the whole evaluation ------------------------------------------------------------------


def evaluate(out: Path, train: dict, settings: toy_train.Settings, ev: EvalSettings) -> dict:
    """Search, merge and score everything; return the results (also written as JSON)."""
    from mergekit_expo.merge.formula import extrapolate

    started = time.perf_counter()
    eval_dir = out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    files = write_prompts(eval_dir, settings, ev)
    test_prompts = read_prompt_file(files["test"])
    dev_prompts = read_prompt_file(files["dev"])
    sft = Path(train["sft"])
    timings: dict[str, float] = {}
    results: dict = {"eval_settings": ev.__dict__, "dpo": {}, "timings": timings}

    stages = tqdm(total=len(train["dpo"]) + 3, desc="evaluation")
    # 1. each DPO checkpoint: α search on dev, winner merged by mergekit-yaml, both on test
    results["test_sft"] = measure(sft, test_prompts, ev).as_dict()
    for step, path in train["dpo"].items():
        t0 = time.perf_counter()
        name = f"dpo_step{int(step):04d}"
        stages.set_postfix_str(name)
        config = write_config(eval_dir / name / "expo.yml", sft, [Path(path)])
        rows = run_search(config, eval_dir / name / "search", files["dev"], ev,
                          alphas=ev.dpo_alphas)
        best = max(rows, key=lambda r: r["mean"])
        merged = mergekit_yaml(eval_dir / name / "search" / "best.yml", eval_dir / name / "merged")
        results["dpo"][name] = {
            "step": int(step),
            "fraction": int(step) / settings.dpo_steps,
            "best_alpha": best["alpha"],
            "dev_curve": [_curve_point(r) for r in sorted(rows, key=lambda r: r["alpha"])],
            "test_plain": measure(Path(path), test_prompts, ev).as_dict(),
            "test_expo": measure(merged, test_prompts, ev).as_dict(),
        }
        timings[name] = time.perf_counter() - t0
        stages.update()

    last_step = str(settings.dpo_steps)
    results["dpo_geometry"] = weight_geometry(
        sft, {f"dpo_step{int(k):04d}": Path(v) for k, v in train["dpo"].items()},
        f"dpo_step{int(last_step):04d}",
    )

    # 2. iterative DPO: (λ, α) search on dev, winner merged, θ_1..θ_T and the merge on test
    t0 = time.perf_counter()
    stages.set_postfix_str("iterative")
    iterates = [Path(p) for p in train["iterative"]]
    config = write_config(eval_dir / "iterative" / "expo.yml", sft, iterates)
    rows = run_search(config, eval_dir / "iterative" / "search", files["dev"], ev,
                      alphas=ev.iter_alphas, lambdas=ev.iter_lambdas)
    best = max(rows, key=lambda r: r["mean"])
    best_expo = max((r for r in rows if r["lambda"] == 0), key=lambda r: r["mean"])
    merged = mergekit_yaml(eval_dir / "iterative" / "search" / "best.yml",
                           eval_dir / "iterative" / "merged")
    expo_config = write_config(eval_dir / "iterative" / "expo_only.yml", sft, iterates,
                               alpha=best_expo["alpha"], lam=0.0)
    merged_expo = mergekit_yaml(expo_config, eval_dir / "iterative" / "merged_expo_only")
    results["iterative"] = {
        "best_alpha": best["alpha"],
        "best_lambda": best["lambda"],
        "best_alpha_lambda0": best_expo["alpha"],
        "dev_grid": [_curve_point(r) for r in rows],
        "test_iterates": [measure(p, test_prompts, ev).as_dict() for p in iterates],
        "test_merged": measure(merged, test_prompts, ev).as_dict(),
        "test_expo_only": measure(merged_expo, test_prompts, ev).as_dict(),
    }
    # the merged checkpoint is the float64 formula rounded once: check against the kernel
    ref_state, iter_states = state(sft), [state(p) for p in iterates]
    expected = {
        k: extrapolate(ref_state[k], iter_states[-1][k], [s[k] for s in iter_states[:-1]],
                       alpha=best["alpha"], lam=best["lambda"])
        for k in ref_state
    }
    results["iterative"]["merge_max_abs_diff_vs_kernel"] = max_weight_difference(merged, expected)
    mean_dir = eval_dir / "iterative" / "mean_intermediates"
    if iterates[:-1] and not (mean_dir / "model.safetensors").exists():
        model, tokenizer = toy_train.load(iterates[0])
        mean = {k: sum(s[k] for s in iter_states[:-1]) / len(iter_states[:-1]) for k in ref_state}
        model.load_state_dict(mean)
        toy_train.save(model, tokenizer, mean_dir)
    geometry_models = {f"theta{i + 1}": p for i, p in enumerate(iterates)}
    if iterates[:-1]:
        geometry_models["theta_bar"] = mean_dir
    results["iterative"]["geometry"] = weight_geometry(sft, geometry_models,
                                                       f"theta{len(iterates)}")
    timings["iterative"] = time.perf_counter() - t0
    stages.update()

    # 3. implicit reward vs α, on the final DPO checkpoint (λ = 0) and on the iterative merge
    t0 = time.perf_counter()
    stages.set_postfix_str("implicit reward")
    last = f"dpo_step{settings.dpo_steps:04d}"
    dpo_rows = _rows(eval_dir / last / "search")
    fixed = next(r for r in dpo_rows if r["alpha"] == 0)["responses"]
    implicit = {
        "dpo_final": implicit_rewards(sft, Path(train["dpo"][str(settings.dpo_steps)]), [],
                                      sorted(dpo_rows, key=lambda r: r["alpha"]), dev_prompts,
                                      settings.beta, fixed),
    }
    lam_rows = sorted((r for r in rows if r["lambda"] == best["lambda"]), key=lambda r: r["alpha"])
    fixed_iter = next(r for r in lam_rows if r["alpha"] == 0)["responses"]
    implicit["iterative_best_lambda"] = implicit_rewards(
        sft, iterates[-1], iterates[:-1], lam_rows, dev_prompts, settings.beta, fixed_iter
    )
    results["implicit"] = {name: implicit_summary(points) for name, points in implicit.items()}
    timings["implicit"] = time.perf_counter() - t0
    stages.update()

    t0 = time.perf_counter()
    stages.set_postfix_str("plots")
    import toy_plots

    results["plots"] = [str(p) for p in toy_plots.plot_all(results, out / "plots")]
    timings["plots"] = time.perf_counter() - t0
    stages.update()
    stages.close()
    timings["evaluation_total"] = time.perf_counter() - started
    return results


def _rows(search_dir: Path) -> list[dict]:
    """The rows of the search's last settings key, one per (α, λ)."""
    lines = (search_dir / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    key = rows[-1].get("key")
    unique = {(r["alpha"], r["lambda"]): r for r in rows if r.get("key") == key}
    return list(unique.values())


def _curve_point(row: dict) -> dict:
    return {
        "alpha": row["alpha"],
        "lambda": row["lambda"],
        "mean": row["mean"],
        "sem": row["sem"],
        "length": row["mean_length_tokens"],
    }
