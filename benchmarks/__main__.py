"""``python -m benchmarks``: the performance benchmark of issue 3 (see benchmarks/README.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache"
DEFAULT_RESULTS = HERE / "results"


@click.group()
def main() -> None:
    """Benchmarks of mergekit-expo against task_arithmetic, transformers and the I/O floor."""


@main.command()
@click.option("--params", "sizes", multiple=True, default=("1.1B",), show_default=True,
              help="Model size(s). The first gets every row; later ones the memory rows only.")
@click.option("--quick", is_flag=True,
              help="Tiny checkpoints (~1 M params), one repeat: checks the harness in ~1 min.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True, help="Where checkpoints are kept.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_RESULTS, show_default=True, help="Logs, configs, results.json.")
@click.option("--alpha", type=float, default=0.3, show_default=True)
@click.option("--lambda", "lam", type=float, default=0.3, show_default=True)
@click.option("--iterates", type=int, default=3, show_default=True,
              help="T: checkpoints θ₁…θ_T after θ₀ for the (λ, α) rows.")
@click.option("--shard-size", default="1GB", show_default=True,
              help="Input shard size in bytes (K/M/G suffixes).")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="Runs per row (interleaved); the table shows the median.")
@click.option("--flag", "flags", multiple=True,
              help="Extra mergekit option for every mergekit row, e.g. --flag=--async-write.")
@click.option("--low-memory-flags", default="--out-shard-size 500M", show_default=True,
              help="The flags the *_lowmem rows add.")
@click.option("--only", default=None, help="Comma-separated row keys to run (default: all).")
@click.option("--flag-sweep", is_flag=True, help="Add one expo row per mergekit option.")
@click.option("--no-extras", is_flag=True, help="Skip the task_arithmetic dtype: float32 row.")
@click.option("--keep-outputs", is_flag=True, help="Keep merged models (disk!).")
@click.option("--wait-quiet", type=float, default=None,
              help="Before each run, wait until other processes keep fewer than this many cores "
                   "busy (e.g. 0.2 on a shared machine). Recorded per run either way.")
@click.option("--quiet-timeout", type=float, default=900.0, show_default=True,
              help="Longest wait for --wait-quiet, in seconds per run.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="PNG path (default: in the session's results directory).")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the text report to this file.")
def run(sizes, quick, cache_dir, results_dir, alpha, lam, iterates, shard_size, repeats, flags,
        low_memory_flags, only, flag_sweep, no_extras, keep_outputs, wait_quiet, quiet_timeout,
        plot_path, markdown):
    """Build checkpoints, run every contender as its own process, check, tabulate and plot."""
    from benchmarks.report import plot, targets, text_report
    from benchmarks.run import Settings, run_session
    from benchmarks.synthetic import parse_count

    settings = Settings(
        sizes=[parse_count(s) for s in (("2M",) if quick else sizes)],
        cache=cache_dir.resolve(),
        results=results_dir.resolve(),
        alpha=alpha,
        lam=lam,
        iterates=iterates,
        shard_bytes=int(parse_count(shard_size)),
        repeats=1 if quick else repeats,
        flags=tuple(flags),
        low_memory_flags=tuple(low_memory_flags.split()),
        include=set(only.split(",")) if only else None,
        flag_sweep=flag_sweep and not quick,
        extras=not no_extras,
        quick=quick,
        keep_outputs=keep_outputs,
        quiet_limit=wait_quiet,
        quiet_timeout=quiet_timeout,
    )
    session = run_session(settings)
    report = text_report(session)
    png = plot(session, plot_path or Path(session["directory"]) / "performance.png")
    click.echo(report)
    click.echo(f"\nplot: {png}\nresults: {session['results_file']}")
    if markdown:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(report + "\n")
    missed = [name for size in session["sizes"][:1] for name, _, _, ok in targets(size) if not ok]
    if missed:
        click.echo(f"targets not met: {missed}")


@main.command()
@click.argument("results", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path))
def report(results, plot_path):
    """Print the table (and redraw the plot) of an earlier session's results.json."""
    from benchmarks.report import plot, text_report

    session = json.loads(results.read_text())
    click.echo(text_report(session))
    if plot_path:
        click.echo(f"plot: {plot(session, plot_path)}")


@main.command()
@click.option("--params", default="1.1B", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True)
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_RESULTS, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--alpha", type=float, default=0.3, show_default=True)
@click.option("--wait-quiet", type=float, default=None)
@click.option("--flag", "flags", multiple=True)
def breakdown(params, cache_dir, results_dir, repeats, alpha, wait_quiet, flags):
    """Where the wall time of expo and task_arithmetic goes, phase by phase."""
    from benchmarks.breakdown import main as breakdown_main
    from benchmarks.synthetic import parse_count

    click.echo(breakdown_main(parse_count(params), cache_dir.resolve(), results_dir.resolve(),
                            repeats, alpha, wait_quiet, tuple(flags)))


@main.command()
@click.option("--elements", default="50M", show_default=True,
              help="Elements per tensor pair for the speed measurement.")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's).")
def kernel(elements, threads):
    """Per-tensor kernels: speed and agreement with float64 across the α and λ grid."""
    from benchmarks.kernel import main as kernel_main
    from benchmarks.synthetic import parse_count

    kernel_main(int(parse_count(elements)), threads)


@main.command()
@click.option("--runs", type=int, default=40, show_default=True,
              help="Interpreter starts per variant (interleaved); the medians are compared.")
@click.option("--wait-quiet", type=float, default=None,
              help="First wait until other processes keep fewer than this many cores busy.")
def startup(runs, wait_quiet):
    """What the start-up hook (mergekit_expo.pth) adds to every Python process."""
    from benchmarks.startup import main as startup_main

    click.echo(startup_main(runs, wait_quiet))


@main.command()
@click.option("--params", default="500M", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_RESULTS / "staging", show_default=True,
              help="Where the merged model is written (and deleted).")
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--wait-quiet", type=float, default=None)
def staging(params, cache_dir, work_dir, repeats, wait_quiet):
    """What writing through a staging folder adds to an expo merge (same process, in turn)."""
    from benchmarks.staging import main as staging_main
    from benchmarks.synthetic import parse_count

    work_dir.mkdir(parents=True, exist_ok=True)
    click.echo(staging_main(parse_count(params), cache_dir.resolve(), work_dir.resolve(),
                            repeats, wait_quiet))


if __name__ == "__main__":
    sys.exit(main())
