"""The ``mergekit-expo`` command (click, like mergekit's own tools)."""

from __future__ import annotations

from pathlib import Path

import click


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
    help="The model the adapters were trained over (needed for modules_to_save).",
)
@click.option(
    "--reference-adapter", type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="θ₀ = base + this adapter (an SFT adapter the DPO adapters do not include).",
)
def lora(adapters, out: Path, alpha: float, lam: float, base, reference_adapter) -> None:
    """Write an extrapolated LoRA adapter to OUT: update (1+α)× the DPO adapter's.

    One ADAPTER (θ₁ = θ₀ + s·BA): the scaling is multiplied, no weight changes (DoRA: rows of
    B and the magnitude, needs --base). Several, or --reference-adapter: one adapter of
    concatenated ranks. See docs/lora.md.
    """
    from mergekit_expo.lora.adapter import AdapterError
    from mergekit_expo.lora.extrapolate import expo_adapter

    try:
        written = expo_adapter(
            list(adapters), out, alpha=alpha, lam=lam,
            reference_adapter=reference_adapter, base=base,
        )
    except AdapterError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"Extrapolated adapter (α = {alpha:g}): {written.resolve()}")


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
    "--scorer",
    "function",
    metavar="MODULE:FUNCTION",
    help="Scorer: a Python function (prompt, response) -> float; also path/to/file.py:fn.",
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
@click.option("--limit", type=int, help="Use only the first N prompts/pairs.")
@click.option(
    "--write-best",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="OUT",
    help="Merge the winner with mergekit into OUT (config saved as OUT_DIR/best.yml).",
)
@click.option("--save-responses", is_flag=True, help="Keep sampled responses in the results.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def search(config: Path, out_dir: Path, **options) -> None:
    """Grid-search α (and λ) for an expo CONFIG; results, plot and best.yml go to OUT_DIR.

    Each candidate's weights are set in place from θ₀ and θ_T (and θ̄): inputs are read once,
    no model is written or reloaded. A re-run with the same settings resumes. With models given
    as BASE+ADAPTER only the LoRA scalings change, and the winner is also written as an adapter.
    """
    import logging

    from pydantic import ValidationError

    from mergekit_expo.merge.guards import NonFiniteError
    from mergekit_expo.search.merge_config import SearchConfigError
    from mergekit_expo.search.prompts import JsonlError
    from mergekit_expo.search.run import describe, run_search
    from mergekit_expo.search.scorers import ScorerError
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
    if options["pairs"] is not None:
        scorer = {"kind": "dpo", "pairs": options["pairs"], "beta": options["beta"]}
    elif options["reward_model"] is not None:
        scorer = {"kind": "reward_model", "path": options["reward_model"]}
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
            limit=options["limit"],
            write_best=options["write_best"],
            save_responses=options["save_responses"],
            progress=options["progress"],
        )
    except (ValueError, ValidationError) as error:
        raise click.UsageError(str(error)) from None
    try:
        report = run_search(settings)
    except (SearchConfigError, JsonlError, ScorerError, NonFiniteError, FileNotFoundError) as error:
        # these name the file and line, the tensor or the setting: no traceback needed
        raise click.ClickException(str(error)) from None

    click.echo("\nCandidates (mean score ± standard error):")
    for row in report.rows:
        click.echo("  " + describe(row))
    if report.winner is None:
        raise click.ClickException("no candidate produced a score; see the errors above")
    best = report.winner
    click.echo(
        f"\nBest: alpha = {best['alpha']:g}, lambda = {best['lambda']:g} (score {best['mean']:.4g})"
    )
    click.echo(f"  results:     {report.results.resolve()}")
    if report.plot:
        click.echo(f"  plot:        {report.plot.resolve()}")
    click.echo(f"  best config: {report.best_config.resolve()}")
    if report.adapter:
        click.echo(f"  best adapter: {report.adapter.resolve()}")
    if report.merged:
        click.echo(f"  merged model (mergekit): {report.merged.resolve()}")
    else:
        click.echo(f"  merge it:    mergekit-yaml {report.best_config.resolve()} OUT")
