"""The ``mergekit-expo`` command (click, like mergekit's own tools)."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_expo.merge.parameters import DEFAULT_WARN_RELATIVE_CHANGE


@click.group()
@click.version_option(package_name="mergekit-expo")
def main() -> None:
    """Model extrapolation (ExPO) for mergekit. Merges run through `mergekit-yaml`."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--alpha", type=float, default=0.3, show_default=True, help="Extrapolation α.")
def demo(out: Path, alpha: float) -> None:
    """Build tiny SFT/aligned checkpoints in OUT, extrapolate them with mergekit-yaml."""
    from mergekit_expo.demo.run import run_demo

    report = run_demo(out, alpha=alpha)
    merged = out.resolve() / "merged"
    click.echo(f"\nExtrapolated model: {merged}")
    click.echo(f"  config:        {out.resolve() / 'expo.yml'}")
    click.echo(
        f"  weight step:   ‖θ₂ − θ₁‖ / ‖θ₁ − θ₀‖ = {report['alpha_measured']:.4f} (alpha = {alpha})"
    )
    click.echo(
        f"  next-token KL(aligned ‖ extrapolated) = {report['kl_aligned_to_merged']:.3g} nats; "
        f"top-1 agreement {report['top1_agreement']:.0%}"
    )


@main.command()
@click.argument(
    "adapters", nargs=-1, required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--alpha", type=float, required=True, help="Extrapolation α.")
@click.option(
    "--lambda", "lam", type=float, default=0.0, show_default=True,
    help="Iterative merge λ: ADAPTERS are θ₁…θ_T, the last is θ_T.",
)
@click.option(
    "--base", type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The model the adapters were trained over (needed for modules_to_save and DoRA); "
    "checked against them: name, shapes, saved tensors.",
)
@click.option(
    "--reference-adapter", type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="θ₀ = base + this adapter (an SFT adapter the DPO adapters do not include).",
)
@click.option(
    "--ignore-base-name", is_flag=True,
    help="--base is the adapters' base model under another name than their "
    "base_model_name_or_path (shapes and saved tensors are still checked).",
)
@click.option(
    "--max-relative-change", type=float, default=DEFAULT_WARN_RELATIVE_CHANGE, show_default=True,
    help="Refuse --base if a saved module differs from its tensor by more than this share of "
    "its norm (the merge's warn_relative_change).",
)
def lora(adapters, out: Path, alpha: float, lam: float, base, reference_adapter,
         ignore_base_name: bool, max_relative_change: float) -> None:
    """Write an extrapolated LoRA adapter to OUT: update (1+α)× the DPO adapter's.

    One ADAPTER (θ₁ = θ₀ + s·BA): the scaling is multiplied, no weight changes (DoRA: rows of
    B and the magnitude, needs --base). Several, or --reference-adapter: one adapter of
    concatenated ranks. OUT gets the whole new adapter or keeps what it held; inputs and
    folders holding a model are refused. See docs/lora.md.
    """
    from mergekit_expo.errors import ExpoError
    from mergekit_expo.lora.extrapolate import expo_adapter

    try:
        written = expo_adapter(
            list(adapters), out, alpha=alpha, lam=lam, reference_adapter=reference_adapter,
            base=base, ignore_base_name=ignore_base_name, max_relative_change=max_relative_change,
        )
    except ExpoError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:  # a folder that cannot be made or read: its path and the reason
        where = error.filename or out
        raise click.ClickException(f"{where}: {error.strerror or error}") from None
    click.echo(f"Extrapolated adapter (α = {alpha:g}): {written.resolve()}")


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_path", required=False, type=click.Path(path_type=Path))  # a file: a finding
@click.option("--cuda", is_flag=True, help="The merge will run with --cuda: check CUDA is there.")
@click.option("--device", default=None, help="The merge's --device, checked the same way.")
@click.option(
    "--allow-warnings", is_flag=True, help="Exit 0 when there are warnings but no errors."
)
@click.option(
    "--lora-merge-cache", metavar="DIR",
    help="The merge's --lora-merge-cache, needed for BASE+ADAPTER inputs (merged there once).",
)
def check(
    config: Path, out_path: Path | None, cuda: bool, device: str | None, allow_warnings: bool,
    lora_merge_cache: str | None,
) -> None:
    """Preflight an expo CONFIG in seconds: headers, not weights. Exit 0 only if nothing is wrong.

    Checks the config (unknown or misplaced parameters, filters that match nothing), every
    input (files complete), the roles and α/λ per slice, tensors the merge would not write,
    tied embeddings, dtypes, a relatedness figure on a few rows, free space at OUT_PATH, and
    the chat template and generation config the output will carry.
    """
    from mergekit_expo.check.preflight import run_check

    report = run_check(config, out_path, device=device or ("cuda" if cuda else "cpu"),
                       lora_merge_cache=lora_merge_cache)
    for line in report.lines:
        click.echo(f"  {line}")
    for message in report.warnings():
        click.echo(f"WARNING: {message}", err=True)
    for message in report.errors():
        click.echo(f"ERROR: {message}", err=True)
    errors, warnings = len(report.errors()), len(report.warnings())
    if errors or (warnings and not allow_warnings):
        click.echo(f"{config}: {errors} error(s), {warnings} warning(s)", err=True)
        raise SystemExit(1)
    click.echo(f"{config}: nothing wrong" + (f" ({warnings} warning(s))" if warnings else ""))


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--alpha",
    "alphas",
    multiple=True,
    metavar="GRID",
    help="α values: 0.1,0.3,1 or start:stop:step (inclusive); repeatable. "
    "[default: 0.1,0.2,0.3,0.4,0.5]",
)
@click.option(
    "--lambda",
    "lambdas",
    multiple=True,
    metavar="GRID",
    help="λ values, same syntax. [default: the config's lambda, else 0]",
)
@click.option(
    "--prompts",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='Held-out prompts, JSONL: {"prompt": "..."} per line.',
)
@click.option(
    "--reward-model",
    metavar="PATH",
    help="Scorer: a sequence-classification reward model (one output), local dir or hub id.",
)
@click.option(
    "--reward-engine",
    type=click.Choice(["hf", "vllm"]),
    default="hf",
    show_default=True,
    help="Run the --reward-model with transformers or as a vLLM pooling engine.",
)
@click.option(
    "--scorer",
    "function",
    metavar="MODULE:FUNCTION",
    help="Scorer: a Python function (prompt, response) -> float; also path/to/file.py:fn; "
    "or lm-eval:TASKS, lm-eval's metric on the candidate (no --prompts; see --lm-eval-args).",
)
@click.option(
    "--pairs",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Scorer: DPO implicit-reward accuracy on preference pairs, JSONL with "
    "prompt/chosen/rejected (θ₀ is the reference policy; no generation).",
)
@click.option("--beta", type=float, default=0.1, show_default=True, help="DPO β (with --pairs).")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=0.9, show_default=True)
@click.option("--top-k", type=int, default=40, show_default=True, help="0 disables top-k.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed per candidate.")
@click.option(
    "--batch-size", type=int, default=8, show_default=True,
    help="Prompts per generation batch; also the reward-model and DPO batch.",
)
@click.option(
    "--chat-template",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Wrap prompts in the final model's chat template.",
)
@click.option("--device", default="cpu", show_default=True, help="e.g. cuda, cuda:1, mps.")
@click.option(
    "--inputs-on-device",
    type=click.Choice(["auto", "yes", "no"]),
    default="auto",
    show_default=True,
    help="Keep θ₀, θ_T (and θ̄) on --device so a candidate needs no host traffic; auto: on an "
    "accelerator when they fit, never on the CPU (there they stay memory-mapped).",
)
@click.option("--limit", type=int, help="Use only the first N prompts/pairs.")
@click.option(
    "--write-best",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="OUT",
    help="Merge the winner with mergekit into OUT (config saved as OUT_DIR/best.yml).",
)
@click.option("--save-responses", is_flag=True, help="Keep sampled responses in the results.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option(
    "--groups", "groups", multiple=True, metavar="GROUP",
    help="Per-module α: 'modules' (norms, attention, mlp, embeddings_head), one preset, or "
    "NAME=FILTER[+FILTER] (mergekit filters, first match wins); repeatable.",
)
@click.option("--layer-bands", type=int, metavar="K", help="Split the layers into K bands.")
@click.option("--trials", type=int, default=0, show_default=True,
              help="Per-group candidates proposed by Optuna after the uniform grid.")
@click.option("--trial-seed", type=int, default=0, show_default=True)
@click.option("--trial-alpha", metavar="LOW:HIGH",
              help="α range of the trials [default: the grid's].")
@click.option("--trial-step", type=float, default=0.05, show_default=True,
              help="Trial values are multiples of this step.")
@click.option("--guard", metavar="SPEC",
              help="Second score: loglik:TEXTS.jsonl, lm-eval:TASKS, a reward-model dir, or "
              "MODULE:FUNCTION.")
@click.option("--max-guard-drop", type=float, metavar="EPS",
              help="Winner: best reward among candidates whose guard fell ≤ EPS below α = 0.")
@click.option("--holdout-prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Score the winner on these prompts (pairs with --pairs) too.")
@click.option("--holdout-fraction", type=float, metavar="F",
              help="Hold out this share of the prompts (pairs) to score the winner on.")
@click.option("--engine", type=click.Choice(["auto", "hf", "vllm"]), default="auto",
              show_default=True,
              help="Generate with transformers (hf) or one vLLM engine; auto: vllm where it is "
              "installed and --device is a GPU.")
@click.option("--vllm-args", metavar="K=V[,K=V]",
              help="vllm.LLM arguments, e.g. tensor_parallel_size=2,gpu_memory_utilization=0.8.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Score candidates in N Ray actors, each with its own engine and scorer.")
@click.option("--ray-address", metavar="ADDR", help="Join this Ray cluster (e.g. auto).")
@click.option("--worker-gpus", type=float, default=0, show_default=True,
              help="GPUs per Ray actor (its vLLM tensor parallelism needs as many).")
@click.option("--lm-eval-args", metavar="K=V[,K=V]",
              help="With lm-eval:TASKS (--guard, --scorer): lm_eval.simple_evaluate arguments "
              "(limit, num_fewshot, ...) and include_path=DIR for local task YAMLs.")
def search(config: Path, out_dir: Path, **options) -> None:
    """Grid-search α (and λ) for an expo CONFIG; results, plot and best.yml go to OUT_DIR.

    Each candidate's weights are set in place from θ₀ and θ_T (and θ̄): inputs are read once,
    no model is written or reloaded. A re-run with the same settings resumes. With models given
    as BASE+ADAPTER only the LoRA scalings change, and the winner is also written as an adapter.
    """
    import logging

    from pydantic import ValidationError

    from mergekit_expo.errors import ExpoError
    from mergekit_expo.output.console import lines_beside_bars
    from mergekit_expo.search.run import describe, run_search
    from mergekit_expo.search.settings import SearchSettings, parse_grid

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mergekit_expo").setLevel(logging.INFO)
    flags = {"reward_model": "--reward-model", "function": "--scorer", "pairs": "--pairs"}
    chosen = [flag for name, flag in flags.items() if options[name] is not None]
    if len(chosen) != 1:
        raise click.UsageError(
            "choose exactly one scorer: --reward-model PATH, --scorer MODULE:FUNCTION or "
            "--pairs FILE" + (f" (got {', '.join(chosen)})" if chosen else "")
        )
    if options["reward_engine"] != "hf" and options["reward_model"] is None:
        raise click.UsageError("--reward-engine applies to --reward-model only")
    if options["pairs"] is not None:
        scorer = {"kind": "dpo", "pairs": options["pairs"], "beta": options["beta"]}
    elif options["reward_model"] is not None:
        scorer = {"kind": "reward_model", "path": options["reward_model"],
                  "engine": options["reward_engine"]}
    elif options["function"].startswith("lm-eval:"):
        scorer = {"kind": "lm_eval", "tasks": options["function"].removeprefix("lm-eval:")}
    else:
        scorer = {"kind": "callable", "function": options["function"]}
    try:
        alphas, lambdas = parse_grid(options["alphas"]), parse_grid(options["lambdas"])
        settings = SearchSettings(
            config=config,
            out_dir=out_dir,
            **({"alphas": alphas} if alphas else {}),
            lambdas=lambdas,
            prompts=options["prompts"],
            scorer=scorer,
            sampling={
                key: options[key]
                for key in (
                    "temperature",
                    "top_p",
                    "top_k",
                    "max_new_tokens",
                    "seed",
                    "batch_size",
                    "chat_template",
                )
            },
            device=options["device"],
            inputs_on_device=options["inputs_on_device"],
            limit=options["limit"],
            write_best=options["write_best"],
            save_responses=options["save_responses"],
            progress=options["progress"],
            **_extended_options(options),
        )
    except (ValueError, ValidationError) as error:
        raise click.UsageError(str(error)) from None
    try:
        with lines_beside_bars():
            report = run_search(settings)
    except (ExpoError, FileNotFoundError) as error:
        # these name the file and line, the tensor, the setting or the candidate: no traceback
        raise click.ClickException(str(error)) from None

    click.echo("\nCandidates (mean score ± standard error):")
    for row in [*report.rows, *report.trials]:
        click.echo("  " + describe(row))
    if report.winner is None:
        raise click.ClickException("no candidate produced a score; see the errors above")
    best = report.winner
    if best.get("groups") is not None:
        from mergekit_expo.search.run import describe_groups

        click.echo(f"\nBest: trial {best['trial']}: {describe_groups(best['groups'])} "
                   f"(score {best['mean']:.4g})")
    else:
        click.echo(f"\nBest: alpha = {best['alpha']:g}, lambda = {best['lambda']:g} "
                   f"(score {best['mean']:.4g})")
    for held in report.holdout:
        click.echo(f"  {held['which']}: search {held['search_mean']:.4g} ± "
                   f"{held['search_sem']:.2g} (n {held['search_n']}), hold-out "
                   f"{held['holdout_mean']:.4g} ± {held['holdout_sem']:.2g} "
                   f"(n {held['holdout_n']})")
    click.echo(f"  results:     {report.results.resolve()}")
    if report.plot:
        click.echo(f"  plot:        {report.plot.resolve()}")
    if report.guard_plot:
        click.echo(f"  guard plot:  {report.guard_plot.resolve()}")
    click.echo(f"  best config: {report.best_config.resolve()}")
    if report.adapter:
        click.echo(f"  best adapter: {report.adapter.resolve()}")
    if report.merged:
        click.echo(f"  merged model (mergekit): {report.merged.resolve()}")
    else:
        click.echo(f"  merge it:    {report.merge_command}")


def _extended_options(options: dict) -> dict:
    """The per-group, guard, hold-out and scale options, as SearchSettings fields."""
    from mergekit_expo.search.settings import parse_options

    out = {
        "groups": list(options["groups"]),
        "layer_bands": options["layer_bands"],
        "trials": options["trials"],
        "trial_seed": options["trial_seed"],
        "trial_step": options["trial_step"],
        "guard": options["guard"],
        "max_guard_drop": options["max_guard_drop"],
        "holdout_prompts": options["holdout_prompts"],
        "holdout_fraction": options["holdout_fraction"],
        "engine": options["engine"],
        "workers": options["workers"],
        "ray_address": options["ray_address"],
        "worker_gpus": options["worker_gpus"],
    }
    out["vllm_args"] = parse_options(options["vllm_args"], "--vllm-args")
    out["lm_eval_args"] = parse_options(options["lm_eval_args"], "--lm-eval-args")
    if options["trial_alpha"]:
        low, sep, high = options["trial_alpha"].partition(":")
        try:
            out["trial_alpha"] = (float(low), float(high))
        except ValueError:
            raise ValueError(f"--trial-alpha {options['trial_alpha']!r}: write LOW:HIGH") from None
    return out
