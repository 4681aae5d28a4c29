"""Per-module α on the toy task: does an α per module group close the gap a single α leaves?

For every DPO checkpoint and for the iterative run, one ``mergekit-expo search`` on the dev
prompts scores the uniform α grid and then ``--trials`` per-group candidates (``--groups
modules``: norms, attention, MLP, embeddings+head; in the iterative run each group also has its
own λ), with the guard ``loglik:`` the SFT demonstrations of the dev prompts and the test prompts
as the search's own hold-out. The per-group winner's ``best.yml`` is merged by ``mergekit-yaml``
and scored on the test prompts like every other model. Reward-free ways to choose α are
compared with the gold-best α: DPO implicit-reward accuracy on held-out preference pairs
(another search, ``--pairs``) and the guard.

    python examples/toy_alignment/toy_modules.py report OUT_SEED0 OUT_SEED1   # docs tables
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_eval  # noqa: E402
import toy_task  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass
class ModuleSettings:
    """Budget of the per-module part (``--smoke`` shrinks it)."""

    trials: int = 20
    trial_seed: int = 0
    groups: tuple[str, ...] = ("modules",)
    guard_texts: int = 256  # SFT demonstrations of the dev prompts (the guard's texts)
    heldout_pairs: int = 512  # SFT-distribution pairs on the dev prompts, labelled by R
    beta: float = 0.1
    epsilons: tuple[float, ...] = field(default=(0.05, 0.1))  # guard drops, nats per token


SMOKE_MODULES = {"trials": 2, "guard_texts": 8, "heldout_pairs": 16}


def write_selection_data(eval_dir: Path, settings, ms: ModuleSettings) -> dict[str, Path]:
    """The guard's texts and the held-out preference pairs, both on the dev prompts only."""
    _, held_out = toy_task.split_prompts(settings.seed)
    dev = held_out[0::2]
    texts = toy_task.sft_dataset(dev, ms.guard_texts, seed=settings.seed + 7)
    pairs = toy_task.offline_preference_pairs(dev, ms.heldout_pairs, seed=settings.seed + 8)
    files = {"guard": eval_dir / "guard_sft_texts.jsonl", "pairs": eval_dir / "dev_pairs.jsonl"}
    for name, rows in (("guard", texts), ("pairs", pairs)):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def read_rows(search_dir: Path, name: str = "results.jsonl") -> list[dict]:
    """Rows of the last results key, in file order (uniform and per-group alike)."""
    lines = (search_dir / name).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    key = rows[-1].get("key")
    return [r for r in rows if r.get("key") == key]


def evaluate_setting(name: str, config: Path, eval_dir: Path, files: dict, ev, ms, *,
                     alphas: str, lambdas: str | None, known: tuple | None) -> dict:
    """Search (uniform grid + per-group trials, guard, hold-out), merge the winner, score it."""
    from mergekit_expo.search.capability import annotate, baseline, pick_guarded_winner

    search_dir = eval_dir / name / "modules"
    extra = ["--trials", str(ms.trials), "--trial-seed", str(ms.trial_seed),
             "--guard", f"loglik:{files['guard']}", "--holdout-prompts", str(files["test"])]
    for group in ms.groups:
        extra += ["--groups", group]
    toy_eval.run_search(config, search_dir, files["dev"], ev, alphas=alphas, lambdas=lambdas,
                        extra=extra)
    rows = read_rows(search_dir)
    grid = [r for r in rows if r.get("groups") is None]
    trials = [r for r in rows if r.get("groups") is not None]
    scored = [r for r in rows if r.get("mean") is not None]
    winner = max(scored, key=lambda r: r["mean"])  # first of equals: grid rows come first
    uniform = max((r for r in grid if r.get("mean") is not None), key=lambda r: r["mean"])
    merged = toy_eval.mergekit_yaml(search_dir / "best.yml", eval_dir / name / "merged_modules")
    test_prompts = toy_eval.read_prompt_file(files["test"])
    test_modules = toy_eval.measure(merged, test_prompts, ev).as_dict()
    # the uniform winner on test: the plain search's merged model when it chose the same
    # (α, λ) (the same model), else merged here
    if winner is uniform:
        uniform_test = test_modules
    elif known is not None and known[:2] == (uniform["alpha"], uniform["lambda"]):
        uniform_test = known[2]
    else:
        model = _uniform_model(config, eval_dir / name, uniform)
        uniform_test = toy_eval.measure(model, test_prompts, ev).as_dict()
    base = baseline(grid)
    guarded = {}
    for eps in ms.epsilons:
        annotate(rows, base, eps)
        pick = pick_guarded_winner(rows)
        guarded[str(eps)] = _brief(pick)
    criteria = _criteria(name, config, eval_dir, files, ev, ms, grid, alphas, lambdas, base)
    holdout = {("winner" if "winner" in r["which"] else "uniform"): r
               for r in _holdout_rows(search_dir, winner, uniform)}
    return {
        "name": name,
        "uniform": {**_brief(uniform), "test": uniform_test},
        "modules": {**_brief(winner), "test": test_modules},
        "difference_test": test_modules["mean"] - uniform_test["mean"],
        "difference_se": math.hypot(test_modules["sem"], uniform_test["sem"]),
        "holdout_in_search": holdout,
        "guarded_winner": guarded,
        "criteria": criteria,
        "guard_baseline": base,
        "points": [{"reward": r["mean"], "guard": r.get("guard_mean"), "alpha": r.get("alpha"),
                    "lambda": r.get("lambda"), "trial": r.get("trial")}
                   for r in scored],
        "candidates": len(grid) + len(trials),
        "search_seconds": sum(r.get("seconds", 0.0) for r in rows),
    }


def _uniform_model(config: Path, where: Path, row: dict) -> Path:
    """The uniform winner merged by mergekit-yaml (when the plain search chose another α)."""
    import yaml

    data = yaml.safe_load(config.read_text())
    data["parameters"] = {"alpha": row["alpha"], "lambda": row["lambda"]}
    path = where / "uniform_best.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return toy_eval.mergekit_yaml(path, where / "merged_uniform")


def _holdout_rows(search_dir: Path, winner: dict, uniform: dict) -> list[dict]:
    out = []
    rows = read_rows(search_dir, "holdout.jsonl") if (search_dir / "holdout.jsonl").exists() else []
    for label, row in (("winner", winner), ("uniform", uniform)):
        for held in rows:
            same = (held.get("groups") == row.get("groups") if row.get("groups") is not None
                    else (held.get("groups") is None and held["alpha"] == row["alpha"]
                          and held["lambda"] == row["lambda"]))
            if same:
                out.append({"which": label, "search": row["mean"], "search_sem": row["sem"],
                            "holdout": held["mean"], "holdout_sem": held["sem"]})
                break
    return out


def _brief(row: dict | None) -> dict:
    if row is None:
        return {}
    return {"alpha": row.get("alpha"), "lambda": row.get("lambda"), "groups": row.get("groups"),
            "trial": row.get("trial"), "dev": row["mean"], "dev_sem": row["sem"],
            "guard": row.get("guard_mean"), "length": row.get("mean_length_tokens")}


def _criteria(name, config, eval_dir, files, ev, ms, grid, alphas, lambdas, base) -> dict:
    """α picked by gold reward (dev), DPO implicit-reward accuracy on held-out pairs, and the
    guard (its maximum; the largest α within each ε), all at the gold-best λ."""
    scored = [r for r in grid if r.get("mean") is not None]
    gold = max(scored, key=lambda r: r["mean"])
    line = sorted((r for r in scored if r["lambda"] == gold["lambda"]), key=lambda r: r["alpha"])
    by_alpha = {r["alpha"]: r for r in line}
    command = [str(toy_eval.BIN / "mergekit-expo"), "search", str(config),
               str(eval_dir / name / "dpo_accuracy"), "--alpha", alphas,
               "--pairs", str(files["pairs"]), "--beta", str(ms.beta),
               "--lambda", str(gold["lambda"]), "--batch-size", str(ev.batch_size),
               "--no-progress"]
    toy_eval._run(command, eval_dir / name / "dpo_accuracy" / "search.log")
    accuracy_rows = [r for r in read_rows(eval_dir / name / "dpo_accuracy")
                     if r.get("mean") is not None]
    by_accuracy = max(accuracy_rows, key=lambda r: r["mean"])  # ties: the smaller α
    by_margin = max(accuracy_rows, key=lambda r: r["mean_margin"])
    by_guard = max(line, key=lambda r: r["guard_mean"])
    within = {}
    for eps in ms.epsilons:
        ok = [r for r in line if base is not None and base - r["guard_mean"] <= eps]
        within[str(eps)] = max(ok, key=lambda r: r["alpha"])["alpha"] if ok else None

    def gold_at(alpha):
        row = by_alpha.get(alpha)
        return None if row is None else row["mean"]

    picks = {
        "gold (dev reward)": gold["alpha"],
        "DPO accuracy (held-out pairs)": by_accuracy["alpha"],
        "DPO mean margin (held-out pairs)": by_margin["alpha"],
        "guard maximum": by_guard["alpha"],
        **{f"guard: largest α with drop ≤ {eps}": a for eps, a in within.items()},
    }
    return {
        "lambda": gold["lambda"],
        "picks": {k: {"alpha": a, "gold_dev": gold_at(a)} for k, a in picks.items()},
        "accuracy_curve": [(r["alpha"], r["mean"]) for r in accuracy_rows],
    }


def evaluate_modules(out: Path, train: dict, settings, ev, ms: ModuleSettings,
                     results: dict) -> dict:
    """The per-module part for every DPO checkpoint and the iterative run."""
    from tqdm.auto import tqdm

    eval_dir = out / "eval"
    files = {"dev": eval_dir / "dev_prompts.jsonl", "test": eval_dir / "test_prompts.jsonl",
             **write_selection_data(eval_dir, settings, ms)}
    sft = Path(train["sft"])
    entries = {}
    names = [f"dpo_step{int(step):04d}" for step in train["dpo"]]
    for name in tqdm([*names, "iterative"], desc="per-module α"):
        known = None
        if name == "iterative":
            config = eval_dir / "iterative" / "expo.yml"
            alphas, lambdas = ev.iter_alphas, ev.iter_lambdas
            found = results.get("iterative")
            if found:
                known = (found["best_alpha"], found["best_lambda"], found["test_merged"])
        else:
            step = str(int(name.removeprefix("dpo_step")))
            config = toy_eval.write_config(eval_dir / name / "expo.yml", sft,
                                           [Path(train["dpo"][step])])
            alphas, lambdas = ev.dpo_alphas, None
            found = results.get("dpo", {}).get(name)
            if found:
                known = (found["best_alpha"], 0.0, found["test_expo"])
        entry = evaluate_setting(name, config, eval_dir, files, ev, ms, alphas=alphas,
                                 lambdas=lambdas, known=known)
        if name in results.get("dpo", {}):
            entry["fraction"] = results["dpo"][name]["fraction"]
            entry["test_plain"] = results["dpo"][name]["test_plain"]
        elif name != "iterative":  # --modules-only: the checkpoint itself, measured here
            step = int(name.removeprefix("dpo_step"))
            entry["fraction"] = step / settings.dpo_steps
            entry["test_plain"] = toy_eval.measure(
                Path(train["dpo"][str(step)]), toy_eval.read_prompt_file(files["test"]), ev
            ).as_dict()
        entries[name] = entry
    return {"settings": {**ms.__dict__, "groups": list(ms.groups)}, "entries": entries}


# -- tables and plots ------------------------------------------------------------------------


def _pm(m: dict) -> str:
    return f"{m['mean']:.2f} ± {m['sem']:.2f}"


def _label(name: str, entry: dict) -> str:
    return "iterative" if name == "iterative" else f"DPO {entry['fraction']:.0%}"


def _values(brief: dict) -> str:
    if brief.get("groups") is None:
        text = f"α = {brief['alpha']:g}"
        return text + (f", λ = {brief['lambda']:g}" if brief.get("lambda") else "")
    parts = []
    for group, (alpha, lam) in sorted(brief["groups"].items()):
        parts.append(f"{group} {alpha:g}" + (f"/{lam:g}" if lam else ""))
    return "; ".join(parts)


def markdown(modules: dict, seed: int | str = "") -> str:
    """Tables of one run's per-module results (appended to report.md)."""
    entries = modules["entries"]
    lines = [f"## Per-module α (seed {seed}, {modules['settings']['trials']} trials per setting)",
             "", "| setting | uniform α (dev-best) | R test, uniform | per-group values "
             "(dev-best) | R test, per-group | difference ± s.e. | DPO 100 % R test |",
             "|---|---|---|---|---|---|---|"]
    full = next((e["test_plain"] for n, e in entries.items() if n != "iterative"
                 and e.get("fraction") == 1.0), None)
    for name, entry in entries.items():
        lines.append(
            f"| {_label(name, entry)} | {_values(entry['uniform'])} | "
            f"{_pm(entry['uniform']['test'])} | {_values(entry['modules'])} | "
            f"{_pm(entry['modules']['test'])} | {entry['difference_test']:+.2f} ± "
            f"{entry['difference_se']:.2f} | {_pm(full) if full else '–'} |"
        )
    lines += ["", "Dev score (selection) vs the search's own hold-out (test prompts, search "
              "seed):", "", "| setting | uniform: dev | uniform: hold-out | per-group: dev | "
              "per-group: hold-out | candidates |", "|---|---|---|---|---|---|"]
    for name, entry in entries.items():
        held = entry["holdout_in_search"]
        cells = []
        for which in ("uniform", "winner"):
            h = held.get(which)
            cells += (["–", "–"] if h is None else
                      [f"{h['search']:.2f} ± {h['search_sem']:.2f}",
                       f"{h['holdout']:.2f} ± {h['holdout_sem']:.2f}"])
        lines.append(f"| {_label(name, entry)} | " + " | ".join(cells)
                     + f" | {entry['candidates']} |")
    keys = list(next(iter(entries.values()))["criteria"]["picks"])
    lines += ["", "α picked by each criterion (dev gold reward at that α in brackets):", "",
              "| setting | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, entry in entries.items():
        picks = entry["criteria"]["picks"]
        cells = [("–" if p["alpha"] is None else f"{p['alpha']:g}"
                  + ("" if p["gold_dev"] is None else f" ({p['gold_dev']:.2f})"))
                 for p in picks.values()]
        lines.append(f"| {_label(name, entry)} | " + " | ".join(cells) + " |")
    lines += ["", "Guarded winner (best dev reward among all candidates whose guard fell by at "
              "most ε nats/token below α = 0):", "",
              "| setting | " + " | ".join(f"ε = {e}" for e in modules["settings"]["epsilons"])
              + " |", "|---" * (len(modules["settings"]["epsilons"]) + 1) + "|"]
    for name, entry in entries.items():
        cells = [f"{_values(b)}: {b['dev']:.2f}" if b else "–"
                 for b in entry["guarded_winner"].values()]
        lines.append(f"| {_label(name, entry)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_pareto(modules: dict, path: Path) -> Path:
    """Dev gold reward vs guard for every candidate of every setting, Pareto front, winners."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergekit_expo.search.capability import pareto_front

    entries = modules["entries"]
    figure, axes = plt.subplots(2, 3, figsize=(13, 8), dpi=100)
    for axis, (name, entry) in zip(axes.flat, entries.items(), strict=False):
        rows = [{"mean": p["reward"], "guard_mean": p["guard"], **p} for p in entry["points"]
                if p["guard"] is not None]
        grid = [r for r in rows if r["trial"] is None]
        trials = [r for r in rows if r["trial"] is not None]
        points = axis.scatter([r["guard_mean"] for r in grid], [r["mean"] for r in grid],
                              c=[r["alpha"] for r in grid], cmap="viridis", s=22,
                              label="uniform α (colour)")
        figure.colorbar(points, ax=axis, label="α")
        axis.scatter([r["guard_mean"] for r in trials], [r["mean"] for r in trials], marker="x",
                     color="tab:red", s=18, alpha=0.6, label="per-group trials")
        front = pareto_front(rows)
        axis.plot([r["guard_mean"] for r in front], [r["mean"] for r in front], color="black",
                  linewidth=1, label="Pareto front")
        for key, marker, colour in (("uniform", "D", "white"), ("modules", "*", "gold")):
            best = entry[key]
            axis.plot([best["guard"]], [best["dev"]], marker=marker, markersize=12,
                      color=colour, markeredgecolor="black", linestyle="none",
                      label=f"best {'uniform' if key == 'uniform' else 'per-group'}")
        if entry["guard_baseline"] is not None:
            axis.axvline(entry["guard_baseline"], color="grey", linestyle=":", linewidth=1)
        axis.set_title(_label(name, entry))
        axis.set_xlabel("guard: log-lik. of SFT demonstrations (nats/token)")
        axis.set_ylabel("gold reward (dev)")
        axis.set_ylim(bottom=max(-8.0, axis.get_ylim()[0]))
        axis.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6)
    for axis in list(axes.flat)[len(entries):]:
        axis.axis("off")
    figure.suptitle("Toy task: gold reward vs guard, every candidate (dotted: α = 0)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def combined(runs: list[dict]) -> str:
    """One table over seeds: uniform vs per-group on test, and the 20 % gap to DPO 100 %."""
    lines = ["| seed | setting | DPO 100 % (no ExPO) | uniform α | per-group α | per-group − "
             "uniform | per-group − DPO 100 % |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        entries = run["modules"]["entries"]
        full = next(e["test_plain"] for n, e in entries.items() if n != "iterative"
                    and e.get("fraction") == 1.0)
        for name, entry in entries.items():
            uni, mod = entry["uniform"]["test"], entry["modules"]["test"]
            gap = mod["mean"] - full["mean"]
            gap_se = math.hypot(mod["sem"], full["sem"])
            lines.append(
                f"| {run['seed']} | {_label(name, entry)} | {_pm(full)} | {_pm(uni)} | "
                f"{_pm(mod)} | {entry['difference_test']:+.2f} ± {entry['difference_se']:.2f} "
                f"| {gap:+.2f} ± {gap_se:.2f} |"
            )
    lines += ["", "Where the reward comes from (test; per answer: words, on-topic words, bad "
              "words; share over 12 words), uniform → per-group:", "",
              "| seed | setting | length | on-topic | bad | > 12 words |",
              "|---|---|---|---|---|---|"]
    for run in runs:
        for name, entry in run["modules"]["entries"].items():
            uni, mod = entry["uniform"]["test"], entry["modules"]["test"]
            lines.append(
                f"| {run['seed']} | {_label(name, entry)} | {uni['length']:.1f} → "
                f"{mod['length']:.1f} | {uni['on_topic']:.2f} → {mod['on_topic']:.2f} | "
                f"{uni['bad']:.2f} → {mod['bad']:.2f} | {uni['over_length']:.0%} → "
                f"{mod['over_length']:.0%} |"
            )
    lines += ["", criteria_summary(runs), "", cost_summary(runs)]
    return "\n".join(lines) + "\n"


def criteria_summary(runs: list[dict]) -> str:
    """Per criterion, over every setting and seed: mean |α − gold-best α| and the mean dev gold
    reward lost against the gold-best α (both at the gold-best λ)."""
    totals: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        for entry in run["modules"]["entries"].values():
            picks = entry["criteria"]["picks"]
            gold = picks["gold (dev reward)"]
            for name, pick in picks.items():
                if name == "gold (dev reward)" or pick["alpha"] is None:
                    continue
                totals.setdefault(name, []).append(
                    (abs(pick["alpha"] - gold["alpha"]), gold["gold_dev"] - pick["gold_dev"]))
    lines = ["| reward-free criterion | mean abs(α − gold-best α) | mean dev reward lost | "
             "settings |", "|---|---|---|---|"]
    for name, values in sorted(totals.items(), key=lambda kv: sum(v[0] for v in kv[1])):
        lines.append(f"| {name} | {sum(v[0] for v in values) / len(values):.2f} | "
                     f"{sum(v[1] for v in values) / len(values):.2f} | {len(values)} |")
    return "\n".join(lines)


def cost_summary(runs: list[dict]) -> str:
    """Candidates and summed per-candidate seconds of each per-module search."""
    lines = ["| seed | setting | candidates (grid + trials) | seconds (sum over candidates) |",
             "|---|---|---|---|"]
    for run in runs:
        for name, entry in run["modules"]["entries"].items():
            lines.append(f"| {run['seed']} | {_label(name, entry)} | {entry['candidates']} | "
                         f"{entry['search_seconds']:.0f} |")
    return "\n".join(lines)


@click.group()
def main() -> None:
    """Tables and plots of the per-module part from finished runs."""


@main.command()
@click.argument("runs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(runs: tuple[Path, ...]) -> None:
    """Print the combined table of RUNS (run.py output directories) and each run's tables."""
    loaded = []
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        loaded.append({"seed": results["training"]["settings"]["seed"],
                       "modules": results["modules"]})
    click.echo(combined(loaded))
    for run in loaded:
        click.echo(markdown(run["modules"], run["seed"]))


if __name__ == "__main__":
    main()
