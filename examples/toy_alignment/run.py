"""One command for the toy alignment reproduction: train, search, merge, score, plot.

    python examples/toy_alignment/run.py OUT_DIR            # the documented run (6.5-8.5 min)
    python examples/toy_alignment/run.py OUT_DIR --smoke    # a few steps of everything

Writes OUT_DIR/train.json (checkpoint paths, settings, timings), OUT_DIR/results.json and
OUT_DIR/report.md (tables), OUT_DIR/plots/*.png. Needs TRL (``pip install mergekit-expo[toy]``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import click  # noqa: E402


def quiet_libraries() -> None:
    """Keep the console to our own progress bars: no per-step logs, no per-call bars."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def train_all(out: Path, settings) -> dict:
    """Tiny Llama from scratch → SFT → DPO (checkpoints) → iterative DPO; paths and timings."""
    import toy_train

    timings: dict[str, float] = {}
    started = time.perf_counter()
    init = toy_train.build_model(out / "init", settings)
    sft = toy_train.train_sft(init, out, settings)
    timings["sft"] = time.perf_counter() - started
    t0 = time.perf_counter()
    dpo = toy_train.train_dpo_checkpoints(sft, out / "dpo", settings)
    timings["dpo"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    iterates = toy_train.train_iterative(sft, out / "iterative", settings)
    timings["iterative"] = time.perf_counter() - t0
    timings["training_total"] = time.perf_counter() - started
    return {
        "sft": str(sft.resolve()),
        "dpo": {str(step): str(path.resolve()) for step, path in dpo.items()},
        "iterative": [str(p.resolve()) for p in iterates],
        "settings": toy_train.settings_dict(settings),
        "timings": timings,
        "loadavg_after_training": os.getloadavg(),
    }


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--smoke", is_flag=True, help="A few steps of everything (for tests).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every stage.")
@click.option("--skip-eval", is_flag=True, help="Train only.")
@click.option("--reuse-training", is_flag=True,
              help="Evaluate the checkpoints of an earlier run in OUT_DIR (train.json).")
@click.option("--module-trials", type=int, help="Per-group trials per setting [default: 20].")
@click.option("--modules-only", is_flag=True,
              help="Evaluate only the per-module part (uniform vs per-group α, guard, criteria).")
def main(out_dir: Path, smoke: bool, seed: int, skip_eval: bool, reuse_training: bool,
         module_trials: int | None, modules_only: bool) -> None:
    """Train the toy task's SFT/DPO/iterative-DPO models in OUT_DIR and evaluate ExPO on them."""
    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("toy_alignment").setLevel(logging.INFO)
    import toy_eval
    import toy_modules
    import toy_plots
    import toy_train

    out = out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = toy_train.Settings(seed=seed, **(toy_train.SMOKE if smoke else {}))
    evaluation = toy_eval.EvalSettings(**(toy_eval.SMOKE_EVAL if smoke else {}))
    started = time.perf_counter()
    load_before = os.getloadavg()
    train_file = out / "train.json"
    if reuse_training:
        train = json.loads(train_file.read_text())
    else:
        train = train_all(out, settings)
        train_file.write_text(json.dumps(train, indent=1))
    click.echo(f"training: {train['timings']['training_total']:.0f} s")
    if skip_eval:
        return
    if modules_only:
        (out / "eval").mkdir(parents=True, exist_ok=True)
        toy_eval.write_prompts(out / "eval", settings, evaluation)
        toy_eval.write_config(out / "eval" / "iterative" / "expo.yml", Path(train["sft"]),
                              [Path(p) for p in train["iterative"]])
        results = {"eval_settings": evaluation.__dict__, "timings": {}, "plots": []}
    else:
        results = toy_eval.evaluate(out, train, settings, evaluation)
    modules = toy_modules.ModuleSettings(**(toy_modules.SMOKE_MODULES if smoke else {}))
    if module_trials is not None:
        modules.trials = module_trials
    t0 = time.perf_counter()
    results["modules"] = toy_modules.evaluate_modules(out, train, settings, evaluation, modules,
                                                      results)
    results["timings"]["modules"] = time.perf_counter() - t0
    results["plots"].append(str(toy_modules.plot_pareto(
        results["modules"], out / "plots" / "reproduction_modules_pareto.png")))
    results["training"] = train
    results["wall_seconds_this_command"] = time.perf_counter() - started
    results["loadavg"] = {"start": load_before, "end": os.getloadavg()}
    results["cpu_count"] = os.cpu_count()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = "" if modules_only else toy_plots.markdown_tables(results) + "\n"
    report += toy_modules.markdown(results["modules"], seed)
    (out / "report.md").write_text(report)
    click.echo(report)
    click.echo(f"total: {results['wall_seconds_this_command']:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
