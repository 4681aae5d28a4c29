"""The table, the targets of issue 3 and the plot, from a session's results."""

from __future__ import annotations

from pathlib import Path

GB = 1e9

# (name, numerator row, denominator row, quantity, limit): ratio must be <= limit
RATIO_TARGETS = [
    ("expo wall time / task_arithmetic's", "expo", "task_arithmetic", "wall_s", 0.8),
    ("expo peak private memory (low-memory flags) / in-RAM's", "expo_lowmem", "inram",
     "peak_private_bytes", 0.3),
    ("(λ, α) one pass wall time / two-step recipe's", "lam_onepass", "lam_twostep", "wall_s",
     0.7),
]
AGREEMENT_TARGET = 0.9999
AGREEMENT_ROWS = ("expo", "expo_lowmem", "lam_onepass")


def _rows(size: dict) -> dict[str, dict]:
    return {row["key"]: row for row in size["rows"]}


def _agreement(row: dict) -> str:
    if row.get("returncode"):
        return f"FAILED (exit {row['returncode']})"
    agreement = row.get("agreement")
    if not agreement:
        return "–"
    text = f"{agreement['share'] * 100:.4f} %"
    return text if agreement["complete"] else text + " (INCOMPLETE)"


def table(size: dict) -> str:
    """A Markdown table of one size's rows."""
    shard = size["input_bytes"] / size["input_shards"] / GB
    lines = [
        f"Model: {size['tag']} parameters ({size['params']:,}), bf16, "
        f"{size['input_shards']} input shards of ≤ {shard:.2f} GB"
        f" ({size['input_bytes'] / GB:.2f} GB per checkpoint)",
        "",
        "| row | wall s | fsync after s | CPU s | peak RSS GB | peak private GB | "
        "agrees with float64 formula | other load, cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in size["rows"]:
        spread = ""
        if row["repeats"] > 1:
            spread = f" ({row['wall_s_min']:.1f}–{row['wall_s_max']:.1f})"
        lines.append(
            f"| {row['label']} | {row['wall_s']:.1f}{spread} | {row['fsync_s']:.1f} | "
            f"{row['cpu_s']:.1f} | {row['peak_rss_bytes'] / GB:.2f} | "
            f"{row['peak_private_bytes'] / GB:.2f} | {_agreement(row)} | "
            f"{row.get('background_cores', 0.0):.2f} |"
        )
    return "\n".join(lines)


def targets(size: dict) -> list[tuple[str, float | None, str, bool | None]]:
    """(name, measured value, limit text, met?) for every target measurable at this size."""
    rows = _rows(size)
    found = []
    for name, top, bottom, quantity, limit in RATIO_TARGETS:
        if top in rows and bottom in rows and rows[bottom][quantity]:
            ratio = rows[top][quantity] / rows[bottom][quantity]
            found.append((name, ratio, f"≤ {limit}", ratio <= limit))
    for key in AGREEMENT_ROWS:
        agreement = rows.get(key, {}).get("agreement")
        if agreement:
            ok = agreement["share"] >= AGREEMENT_TARGET and agreement["complete"]
            found.append((f"{key} agreement", agreement["share"], "≥ 0.9999", ok))
    return found


def targets_table(size: dict) -> str:
    lines = ["| target | measured | limit | met |", "|---|---:|---:|:---:|"]
    for name, value, limit, ok in targets(size):
        shown = f"{value * 100:.4f} %" if "agreement" in name else f"{value:.2f}"
        lines.append(f"| {name} | {shown} | {limit} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def scaling_table(session: dict) -> str:
    """Peak private memory of the memory-relevant rows at every size run."""
    sizes = session["sizes"]
    if len(sizes) < 2:
        return ""
    keys = [r["key"] for r in sizes[0]["rows"] if all(r["key"] in _rows(s) for s in sizes)]
    head = "| row | " + " | ".join(f"{s['tag']}: private / RSS GB" for s in sizes) + " |"
    lines = [head, "|---|" + "---:|" * len(sizes)]
    for key in keys:
        cells = []
        for size in sizes:
            row = _rows(size)[key]
            cells.append(
                f"{row['peak_private_bytes'] / GB:.2f} / {row['peak_rss_bytes'] / GB:.2f}"
            )
        lines.append(f"| {_rows(sizes[0])[key]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_report(session: dict) -> str:
    machine = session["machine"]
    parts = [
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"{machine['ram_gb']} GB RAM; torch {machine['torch']}, mergekit {machine['mergekit']}, "
        f"transformers {machine['transformers']}",
        f"Load average at start {session['load_at_start'][0]:.2f}, at end "
        f"{session['load_at_end'][0]:.2f}",
        f"Settings: {session['settings']}",
    ]
    for size in session["sizes"]:
        loads = [x for row in size["rows"] for x in row["load"]]
        parts += [
            "",
            table(size),
            "",
            f"1-minute load average seen before/after the runs: min {min(loads):.2f}, "
            f"max {max(loads):.2f}",
            "",
            targets_table(size),
        ]
    scaling = scaling_table(session)
    if scaling:
        parts += ["", "Peak memory at each size:", "", scaling]
    return "\n".join(parts)


COLOURS = {
    "floor": "#7f7f7f",
    "lam_floor": "#7f7f7f",
    "expo": "#1f77b4",
    "expo_lowmem": "#6baed6",
    "lam_onepass": "#1f77b4",
    "task_arithmetic": "#ff7f0e",
    "ta_lowmem": "#fdae6b",
    "ta_fp32": "#e6550d",
    "lam_twostep": "#ff7f0e",
    "inram": "#d62728",
}


def plot(session: dict, path: Path) -> Path:
    """Wall time and peak memory of every row at the main size, and memory against size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = session["sizes"][0]
    rows = main["rows"]
    scaling = len(session["sizes"]) > 1
    fig, axes = plt.subplots(1, 3 if scaling else 2, figsize=(18 if scaling else 13, 6.5))
    labels = [row["label"] for row in rows]
    positions = list(range(len(rows)))[::-1]
    colours = [COLOURS.get(row["key"], "#9467bd") for row in rows]

    ax = axes[0]
    walls = [row["wall_s"] for row in rows]
    syncs = [row["fsync_s"] for row in rows]
    ax.barh(positions, walls, color=colours)
    ax.barh(positions, syncs, left=walls, color="none", edgecolor="black", hatch="//",
            label="fsync of the output afterwards")
    for y, wall, sync in zip(positions, walls, syncs, strict=True):
        ax.text(wall + sync, y, f" {wall:.1f}", va="center", fontsize=8)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set_xlabel("seconds (process wall time; hatched: fsync afterwards)")
    ax.set_title(f"Wall time, {main['tag']} parameters")
    ax.legend(loc="lower right", fontsize=8)

    ax = axes[1]
    private = [row["peak_private_bytes"] / GB for row in rows]
    rss = [row["peak_rss_bytes"] / GB for row in rows]
    ax.barh(positions, rss, color="none", edgecolor="black", label="peak RSS (incl. mmap'd files)")
    ax.barh(positions, private, color=colours, label="peak private (RssAnon)")
    for y, value in zip(positions, private, strict=True):
        ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    ax.set_yticks(positions, [""] * len(rows))
    ax.set_xlabel("GB (sum over the process tree)")
    ax.set_title("Peak memory")
    ax.legend(loc="lower right", fontsize=8)

    if scaling:
        ax = axes[2]
        sizes = session["sizes"]
        keys = [r["key"] for r in sizes[0]["rows"] if all(r["key"] in _rows(s) for s in sizes)]
        for key in keys:
            xs = [s["params"] / 1e9 for s in sizes]
            ys = [_rows(s)[key]["peak_private_bytes"] / GB for s in sizes]
            label = _rows(sizes[0])[key]["label"]
            ax.plot(xs, ys, marker="o", color=COLOURS.get(key, "#9467bd"), label=label)
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel("peak private memory, GB")
        ax.set_title("Private memory against model size")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    machine = session["machine"]
    fig.suptitle(
        f"mergekit-expo benchmark: {machine['cpu']}, {machine['logical_cpus']} CPUs, "
        f"{machine['ram_gb']} GB RAM, warm page cache, α = {session['settings']['alpha']}, "
        f"λ = {session['settings']['lambda']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def search_memory_table(session: dict) -> str:
    """The search at each T: private memory against one checkpoint, update against a read."""
    rows = session["rows"]
    checkpoint = rows[0]["checkpoint_bytes"] if rows else 0
    lines = [
        f"Search, {session['params'] / 1e9:.2f} B parameters (bf16, {checkpoint / GB:.2f} GB per "
        f"checkpoint), {rows[0]['candidates'] if rows else 0} candidates (λ = "
        f"{rows[0]['lambda'] if rows else '–'}), {rows[0]['prompts'] if rows else 0} prompts × "
        f"{rows[0]['max_new_tokens'] if rows else 0} new tokens; median of "
        f"{rows[0]['repeats'] if rows else 0} run(s)",
        "",
        "| T (intermediates) | peak private GB | × one checkpoint | peak RSS GB | "
        "weights update per candidate s | read the T + 1 inputs once s | search wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['T']} ({row['intermediates']}) | {row['peak_private_bytes'] / GB:.2f} | "
            f"**{row['private_ratio']:.2f}** | {row['peak_rss_bytes'] / GB:.2f} | "
            f"{row['update_median_s']:.2f} | {row['read_once_s']:.2f} | {row['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def _phase_table(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row["phases"] if k not in keys]
    lines = ["| row | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for row in rows:
        cells = [f"{row['phases'][k]:.1f}" if k in row["phases"] else "–" for k in keys]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return lines


def large_table(session: dict) -> str:
    """The 7 B rows: merges against the I/O floor, and the search."""
    lines = [
        f"Model: {session['params'] / 1e9:.2f} B parameters (Llama: hidden "
        f"{session['shape']['hidden']}, {session['shape']['layers']} layers), bf16, "
        f"{session.get('input_bytes', 0) / GB:.1f} GB per checkpoint; mergekit flags "
        f"`{' '.join(session['settings']['flags'])}`; {session['settings']['repeats']} "
        "repeat(s), cold page cache (the inputs do not fit next to the other work)",
        "",
        "| row | wall s | × I/O floor | CPU s | peak private GB | peak RSS GB | "
        "agrees with float64 formula |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = session.get("rows", [])
    floor = next((r["wall_s"] for r in rows if r["key"] == "floor"), None)
    for row in rows:
        spread = ""
        if row["repeats"] > 1:
            spread = f" ({row['wall_s_min']:.1f}–{row['wall_s_max']:.1f})"
        ratio = f"{row['wall_s'] / floor:.2f}" if floor else "–"
        lines.append(
            f"| {row['label']} | {row['wall_s']:.1f}{spread} | {ratio} | {row['cpu_s']:.1f} | "
            f"{row['peak_private_bytes'] / GB:.2f} | {row['peak_rss_bytes'] / GB:.2f} | "
            f"{_agreement(row)} |"
        )
    phased = [r for r in rows if r.get("phases")]
    if phased:
        lines += ["", "Where the time goes (seconds, median; mergekit rows run `mergekit-yaml` "
                  "with timers, `benchmarks/scripts/phases.py`):", ""]
        lines += _phase_table(phased)
    search = session.get("search")
    if search:
        updates = ", ".join(f"{u:.1f}" for u in search["update_seconds"])
        lines += [
            "",
            f"Search, {search['candidates']} candidates × {search['prompts']} prompts × "
            f"{search['max_new_tokens']} new tokens (ExPO):",
            "",
            "| peak private GB | × one checkpoint | peak RSS GB | weights update per candidate s "
            "| read θ₀ + θ_T once s | total wall s |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {search['peak_private_bytes'] / GB:.2f} | **{search['private_ratio']:.2f}** | "
            f"{search['peak_rss_bytes'] / GB:.2f} | {updates} | {search['read_once_s']:.1f} | "
            f"{search['wall_s']:.1f} |",
        ]
    waits = session.get("memory_waits", [])
    waited = sum(w["waited_s"] for w in waits)
    lines += ["", f"Waited {waited:.0f} s in all for MemAvailable ≥ "
              f"{session['settings']['min_available_bytes'] / GB:.0f} GB before the "
              f"{len(waits)} steps."]
    return "\n".join(lines)
