"""The search's PNG: score (± standard error) and response length against α, one line per λ.

Length is plotted next to the score because extrapolation can amplify a length bias: a score
that rises only together with the length is a warning sign (ExPO paper, §4).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergekit_expo.search.outputs import make_folder, write_file


def plot_search(
    rows: Sequence[dict[str, Any]],
    out: str | Path,
    *,
    winner: dict[str, Any] | None,
    score_label: str,
) -> Path:
    """Write the PNG and return its path. Rows without a score (failed candidates) are skipped."""
    return _save(search_figure(rows, winner=winner, score_label=score_label), out)


def search_figure(rows: Sequence[dict[str, Any]], *, winner: dict[str, Any] | None,
                  score_label: str):
    """The search's figure (two panels sharing the α axis), not yet saved."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    rows = [r for r in rows if r.get("mean") is not None]
    second, second_label = _second_panel(rows)
    figure = Figure(figsize=(7, 6.5), dpi=110)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for lam in sorted({r["lambda"] for r in rows}):
        line = sorted((r for r in rows if r["lambda"] == lam), key=lambda r: r["alpha"])
        alphas = [r["alpha"] for r in line]
        label = f"λ = {lam:g}"
        top.errorbar(
            alphas, [r["mean"] for r in line], yerr=[r["sem"] for r in line],
            marker="o", capsize=3, label=label,
        )
        if second:
            bottom.plot(alphas, [r[second] for r in line], marker="o", label=label)
    if winner is not None:
        _ring(top, winner["alpha"], winner["mean"],
              f"best: α = {winner['alpha']:g}, λ = {winner['lambda']:g}")
    _alpha_scale(bottom, [r["alpha"] for r in rows])
    top.set_ylabel(f"{score_label}\n(mean ± s.e.)")
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    if second:
        bottom.set_ylabel(second_label)
    else:
        bottom.text(0.5, 0.5, "no responses generated", ha="center", va="center",
                    transform=bottom.transAxes)
    bottom.set_xlabel("α (extrapolation)")
    bottom.grid(alpha=0.3)
    top.set_title("mergekit-expo search")
    return figure


def _ring(axes, x: float, y: float, label: str) -> None:
    """The winner as a ring around its point: a filled marker on top would hide the point."""
    axes.plot([x], [y], marker="o", markersize=15, markerfacecolor="none",
              markeredgecolor="black", markeredgewidth=2, linestyle="none", zorder=5,
              label=label)


def _alpha_scale(axes, alphas: Sequence[float]) -> None:
    """A symmetric-log α axis where the grid spans more than a decade (0, 0.1 … 25): on a
    linear one the small values sit on top of each other. Linear up to the smallest step."""
    nonzero = [abs(a) for a in alphas if a]
    if nonzero and max(nonzero) > 10 * min(nonzero):
        axes.set_xscale("symlog", linthresh=min(nonzero), linscale=0.5)


def _second_panel(rows) -> tuple[str | None, str]:
    if rows and all(r.get("mean_length_tokens") is not None for r in rows):
        return "mean_length_tokens", "mean response length\n(tokens)"
    if rows and all(r.get("mean_margin") is not None for r in rows):
        return "mean_margin", "mean implicit-reward margin\nβ·Δ (chosen − rejected)"
    return None, ""


def plot_guard(
    rows: Sequence[dict[str, Any]],
    out: str | Path,
    *,
    winner: dict[str, Any] | None,
    score_label: str,
    guard_label: str,
    max_drop: float | None = None,
) -> Path:
    """Reward against guard for every candidate (grid and per-group trials), the Pareto front
    (no other candidate is better on both), the α = 0 baseline, the ε line and the winner."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mergekit_expo.search.capability import baseline, pareto_front

    rows = [r for r in rows if r.get("mean") is not None and r.get("guard_mean") is not None]
    figure = Figure(figsize=(7, 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    grid = [r for r in rows if r.get("groups") is None]
    trials = [r for r in rows if r.get("groups") is not None]
    for part, marker, label in ((grid, "o", "uniform α (grid)"), (trials, "x", "per-group trials")):
        if part:
            axes.scatter([r["guard_mean"] for r in part], [r["mean"] for r in part],
                         marker=marker, s=28, alpha=0.75, label=label)
    for row in grid:
        axes.annotate(f"{row['alpha']:g}", (row["guard_mean"], row["mean"]), fontsize=6,
                      xytext=(3, 3), textcoords="offset points")
    front = pareto_front(rows)
    axes.plot([r["guard_mean"] for r in front], [r["mean"] for r in front], color="black",
              linewidth=1, label="Pareto front")
    base = baseline(rows)
    if base is not None:
        axes.axvline(base, color="grey", linestyle=":", label="guard at α = 0 (θ_T)")
        if max_drop is not None:
            axes.axvline(base - max_drop, color="red", linestyle="--",
                         label=f"max guard drop ε = {max_drop:g}")
    if winner is not None and winner.get("guard_mean") is not None:
        _ring(axes, winner["guard_mean"], winner["mean"], "winner")
    axes.set_xlabel(guard_label)
    axes.set_ylabel(score_label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    axes.set_title("mergekit-expo search: reward vs guard")
    return _save(figure, out)


def _save(figure, out: str | Path) -> Path:
    """The PNG, moved into place when complete: a full disk leaves no partial or stale plot."""
    figure.tight_layout()
    out = Path(out)
    make_folder(out.parent)
    return write_file(out, figure.savefig)
