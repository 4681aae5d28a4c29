"""``python -m benchmarks``: the performance benchmark of issue 3 (see benchmarks/README.md)."""

from __future__ import annotations

import json
import os
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


PERFORMANCE_ROWS = ("floor,expo,task_arithmetic,inram,expo_lowmem,ta_lowmem,lam_floor,"
                    "lam_onepass,lam_twostep")


@main.command()
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The page to write (docs/performance.md).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The 1.1 B rows' figure (docs/performance.png).")
@click.option("--params", default="1.1B", show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--only", default=PERFORMANCE_ROWS, show_default=True)
@click.option("--large-params", default="7B", show_default=True)
@click.option("--large-repeats", type=int, default=1, show_default=True)
@click.option("--skip-large", is_flag=True, help="No 7 B section.")
@click.option("--reuse-run", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--reuse-breakdown", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--reuse-search", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--reuse-large", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True)
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_RESULTS, show_default=True)
def performance(markdown, plot_path, params, repeats, only, large_params, large_repeats,
                skip_large, reuse_run, reuse_breakdown, reuse_search, reuse_large, cache_dir,
                results_dir):
    """Measure everything docs/performance.md shows and write the page (and its plot)."""
    # what measures (torch, the checkpoints) is imported only for what is not reused
    from benchmarks import performance as page
    from benchmarks.report import plot

    def count(text: str) -> float:
        from benchmarks.synthetic import parse_count

        return parse_count(text)

    cache, results = cache_dir.resolve(), results_dir.resolve()
    run_data = page.load(reuse_run)
    if run_data is None:
        from benchmarks.run import Settings, run_session

        run_data = run_session(Settings(
            sizes=[count(params)], cache=cache, results=results, repeats=repeats,
            include=set(only.split(",")), quiet_limit=None,
        ))
    page.add_raw_walls(run_data)
    if plot_path:
        plot(run_data, plot_path)
    breakdown = page.load(reuse_breakdown)
    if breakdown is None:
        from benchmarks.breakdown import main as breakdown_main

        breakdown_main(count(params), cache, results, repeats, 0.3, None, ())
        breakdown = page.load(results / "breakdown" / "breakdown.json")
    search = page.load(reuse_search)
    if search is None:
        from benchmarks.scale import search_memory

        search = search_memory(count(params), [1, 5], cache, results, 1)
    large_data = page.load(reuse_large)
    if large_data is None and not skip_large:
        from benchmarks.scale import GB
        from benchmarks.scale import large as measure_large

        large_data = measure_large(count(large_params), cache, results, large_repeats,
                                   18 * GB, ("--out-shard-size", "500M"), 2, 4, True, False,
                                   log=click.echo)
    command = " ".join(["python", "-m", "benchmarks", *sys.argv[1:]])
    relative = None
    if plot_path:  # as the page links it: relative to the page
        relative = os.path.relpath(plot_path.resolve(), markdown.resolve().parent)
    text = page.render(command, run_data, breakdown, search, large_data, relative)
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(text)
    click.echo(text)


@main.command("search-memory")
@click.option("--params", default="1.1B", show_default=True)
@click.option("--intermediates", "counts", multiple=True, type=int, default=(1, 5),
              show_default=True, help="Intermediate checkpoints (T − 1) per row.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True)
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_RESULTS, show_default=True)
@click.option("--repeats", type=int, default=1, show_default=True)
def search_memory(params, counts, cache_dir, results_dir, repeats):
    """The search's peak private memory and per-candidate update time for each T."""
    from benchmarks.report import search_memory_table
    from benchmarks.scale import search_memory as measure
    from benchmarks.synthetic import parse_count

    session = measure(parse_count(params), list(counts), cache_dir.resolve(),
                      results_dir.resolve(), repeats)
    click.echo(search_memory_table(session))
    click.echo(f"\nresults: {session['results_file']}")


@main.command()
@click.option("--params", default="7B", show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True,
              help="Checkpoints go to CACHE_DIR/large and are removed at the end.")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_RESULTS, show_default=True)
@click.option("--repeats", type=int, default=1, show_default=True)
@click.option("--flag", "flags", multiple=True, default=("--out-shard-size", "500M"),
              show_default=True, help="mergekit options for both merges (repeat per word).")
@click.option("--min-available-gb", type=float, default=18.0, show_default=True,
              help="Wait before each step until /proc/meminfo's MemAvailable is this high.")
@click.option("--prompts", type=int, default=2, show_default=True)
@click.option("--max-new-tokens", type=int, default=4, show_default=True)
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the merged outputs against the float64 formula (first repeat).")
@click.option("--keep", is_flag=True, help="Keep the checkpoints (≈ 27 GB) for another run.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the disk/memory checks only.")
def large(params, cache_dir, results_dir, repeats, flags, min_available_gb, prompts,
          max_new_tokens, verify, keep, dry_run):
    """The 7 B regime: merges vs the I/O floor, and a 2-candidate search (≈ 40 GB of disk)."""
    from benchmarks.report import large_table
    from benchmarks.scale import GB, plan_large
    from benchmarks.scale import large as measure
    from benchmarks.synthetic import parse_count

    plan = plan_large(parse_count(params), cache_dir.resolve())
    click.echo(
        f"plan: {plan['params']:,} parameters, {plan['checkpoint_bytes'] / GB:.1f} GB per "
        f"checkpoint; writes {plan['write_bytes'] / GB:.1f} GB under {plan['directory']} (needs "
        f"{plan['disk_needed_bytes'] / GB:.1f} GB free, {plan['disk_free_bytes'] / GB:.1f} GB "
        f"are: {'ok' if plan['disk_ok'] else 'NOT ENOUGH'}); MemAvailable now "
        f"{plan['mem_available_bytes'] / GB:.1f} GB, each step waits for {min_available_gb} GB"
    )
    if dry_run:
        return
    session = measure(parse_count(params), cache_dir.resolve(), results_dir.resolve(), repeats,
                      min_available_gb * GB, tuple(flags), prompts, max_new_tokens, verify,
                      keep, log=lambda m: click.echo(m))
    click.echo(large_table(session))
    click.echo(f"\nresults: {session['results_file']}")


@main.command()
@click.option("--elements", default="50M", show_default=True,
              help="Elements per tensor pair for the speed measurement.")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's).")
@click.option("--agreement-elements", default="4M", show_default=True,
              help="Elements per tensor for the agreement grid.")
def kernel(elements, threads, agreement_elements):
    """Per-tensor kernels: speed and agreement with float64 across the α and λ grid."""
    from benchmarks.kernel import main as kernel_main
    from benchmarks.synthetic import parse_count

    kernel_main(int(parse_count(elements)), threads, int(parse_count(agreement_elements)))


@main.command()
@click.option("--elements", default="100k", show_default=True, help="Elements per case.")
def exactness(elements):
    """Elements off the exact formula rounded once, the kernel before issue 20 and today's."""
    from benchmarks.exactness import main as exactness_main
    from benchmarks.synthetic import parse_count

    click.echo(exactness_main(int(parse_count(elements))))


@main.command(name="kernel-ratio")
@click.option("--elements", default="16M", show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True)
def kernel_ratio(elements, repeats):
    """Today's kernels (compiled, torch) against the float64 kernel of 9351e33, interleaved."""
    from benchmarks.kernel import ratio
    from benchmarks.synthetic import parse_count

    click.echo(ratio(int(parse_count(elements)), repeats))


@main.command()
@click.option("--runs", type=int, default=40, show_default=True,
              help="Interpreter starts per variant (interleaved); the medians are compared.")
@click.option("--wait-quiet", type=float, default=None,
              help="First wait until other processes keep fewer than this many cores busy.")
def startup(runs, wait_quiet):
    """What the start-up hook (mergekit_expo.pth) adds to every Python process."""
    from benchmarks.startup import main as startup_main

    click.echo(startup_main(runs, wait_quiet))


@main.command(name="check-cost")
@click.option("--runs", type=int, default=5, show_default=True,
              help="Processes per variant, interleaved (medians); 1 for a quick look.")
@click.option("--wait-quiet", type=float, default=None, help="As for startup.")
def check_cost(runs, wait_quiet):
    """CPU seconds of `mergekit-expo check` on the demo's models, beside the imports it needs."""
    from benchmarks.check_cost import main as measure

    click.echo(measure(runs, wait_quiet))


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
