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
    from mergekit_expo.demo import run_demo

    report = run_demo(out, alpha=alpha)
    merged = out.resolve() / "merged"
    click.echo(f"\nExtrapolated model: {merged}")
    click.echo(f"  config:        {out.resolve() / 'expo.yml'}")
    click.echo(
        f"  weight step:   ‖θ₂ − θ₁‖ / ‖θ₁ − θ₀‖ = {report['alpha_measured']:.4f} "
        f"(alpha = {alpha})"
    )
    click.echo(
        f"  next-token KL(aligned ‖ extrapolated) = {report['kl_aligned_to_merged']:.3g} nats; "
        f"top-1 agreement {report['top1_agreement']:.0%}"
    )
