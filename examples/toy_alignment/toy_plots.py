"""Plots (matplotlib, Agg) and Markdown tables of a toy run's results.json."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(results: dict, out_dir: Path) -> list[Path]:
    """Write the four figures of docs/reproduction.md into ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_expo_curves(results, out_dir / "reproduction_expo_curves.png"),
        plot_expo_table(results, out_dir / "reproduction_expo_checkpoints.png"),
        plot_iterative(results, out_dir / "reproduction_iterative.png"),
        plot_implicit(results, out_dir / "reproduction_implicit_reward.png"),
    ]


def plot_expo_curves(results: dict, path: Path) -> Path:
    """Gold reward and response length vs α for every DPO checkpoint (dev prompts)."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 7), dpi=110)
    for entry in results["dpo"].values():
        curve = entry["dev_curve"]
        alphas = [p["alpha"] for p in curve]
        label = f"DPO {entry['fraction']:.0%} of steps"
        top.errorbar(alphas, [p["mean"] for p in curve], yerr=[p["sem"] for p in curve],
                     marker="o", markersize=3, capsize=2, label=label)
        bottom.plot(alphas, [p["length"] for p in curve], marker="o", markersize=3, label=label)
    top.axhline(12, color="grey", linestyle=":", linewidth=1, label="best possible (R = 12)")
    bottom.axhline(12, color="grey", linestyle=":", linewidth=1, label="penalty-free length cap")
    top.set_ylabel("gold reward R (dev, mean ± s.e.)")
    top.set_ylim(bottom=max(-6.0, top.get_ylim()[0]))
    bottom.set_ylabel("response length (words)")
    bottom.set_xlabel("α (ExPO: θ₁ + α(θ₁ − θ₀))")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    top.set_title("Toy task: reward and length vs α (cf. ExPO paper, Fig. 6)")
    return _save(figure, path, plt)


def plot_expo_table(results: dict, path: Path) -> Path:
    """Test reward of each DPO checkpoint without and with ExPO at its dev-best α."""
    plt = _pyplot()
    names = list(results["dpo"])
    entries = [results["dpo"][n] for n in names]
    xs = range(len(names))
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    width = 0.38
    plain = [e["test_plain"] for e in entries]
    expo = [e["test_expo"] for e in entries]
    axis.bar([x - width / 2 for x in xs], [p["mean"] for p in plain], width,
             yerr=[p["sem"] for p in plain], capsize=3, label="DPO checkpoint")
    axis.bar([x + width / 2 for x in xs], [p["mean"] for p in expo], width,
             yerr=[p["sem"] for p in expo], capsize=3, label="+ ExPO (dev-best α)")
    full = entries[-1]["test_plain"]["mean"]
    axis.axhline(full, color="black", linestyle="--", linewidth=1, label="DPO 100 % (no ExPO)")
    axis.axhline(results["test_sft"]["mean"], color="grey", linestyle=":", linewidth=1,
                 label="SFT")
    axis.set_xticks(list(xs))
    axis.set_xticklabels([f"{e['fraction']:.0%}\nα = {e['best_alpha']:g}" for e in entries])
    axis.set_xlabel("DPO checkpoint (share of steps) and the α picked on dev")
    axis.set_ylabel("gold reward R (test, mean ± s.e.)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title("Toy task: DPO checkpoints with and without ExPO (cf. ExPO paper, Tab. 2)")
    return _save(figure, path, plt)


def plot_iterative(results: dict, path: Path) -> Path:
    """Dev reward over the (λ, α) grid, and the test reward of θ₁…θ_T and the merges."""
    plt = _pyplot()
    entry = results["iterative"]
    grid = entry["dev_grid"]
    lambdas = sorted({p["lambda"] for p in grid})
    alphas = sorted({p["alpha"] for p in grid})
    value = {(p["lambda"], p["alpha"]): p["mean"] for p in grid}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110,
                                         gridspec_kw={"width_ratios": [1.4, 1]})
    matrix = [[value.get((lam, a), float("nan")) for a in alphas] for lam in lambdas]
    image = left.imshow(matrix, aspect="auto", origin="lower", cmap="viridis",
                        vmin=max(-4.0, min(min(r) for r in matrix)))
    top = max(max(r) for r in matrix)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            color = "black" if v > top - 2.5 else "white"
            left.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color=color)
    left.set_xticks(range(len(alphas)))
    left.set_xticklabels([f"{a:g}" for a in alphas], fontsize=7)
    left.set_yticks(range(len(lambdas)))
    left.set_yticklabels([f"{lam:g}" for lam in lambdas])
    left.set_xlabel("α")
    left.set_ylabel("λ")
    left.set_title("dev gold reward of the (λ, α) merge")
    figure.colorbar(image, ax=left)
    bars = [(f"θ{i + 1}", m) for i, m in enumerate(entry["test_iterates"])]
    bars.append((f"ExPO θ_T\nα={entry['best_alpha_lambda0']:g}", entry["test_expo_only"]))
    bars.append((f"merge\nλ={entry['best_lambda']:g} α={entry['best_alpha']:g}",
                 entry["test_merged"]))
    right.bar(range(len(bars)), [b[1]["mean"] for b in bars],
              yerr=[b[1]["sem"] for b in bars], capsize=3,
              color=["#9bb"] * (len(bars) - 2) + ["#c96", "#c63"])
    right.set_xticks(range(len(bars)))
    right.set_xticklabels([b[0] for b in bars], fontsize=7)
    right.set_ylabel("gold reward R (test, mean ± s.e.)")
    right.grid(axis="y", alpha=0.3)
    right.set_title("iterative DPO: θ_t vs merged (test)")
    return _save(figure, path, plt)


def plot_implicit(results: dict, path: Path) -> Path:
    """Mean implicit reward vs α, on-policy samples and fixed samples, with Pearson's r."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(results["implicit"]), figsize=(11, 4), dpi=110,
                                squeeze=False)
    titles = {"dpo_final": "ExPO on DPO 100 % (λ = 0)",
              "iterative_best_lambda": "iterative merge at the dev-best λ"}
    for axis, (name, entry) in zip(axes[0], results["implicit"].items(), strict=True):
        points = entry["points"]
        alphas = [p["alpha"] for p in points]
        axis.plot(alphas, [p["implicit_reward_on_policy"] for p in points], marker="o",
                  label=f"y ~ π_α (on-policy), r = {entry['pearson_on_policy']:.3f}")
        axis.plot(alphas, [p["implicit_reward_fixed"] for p in points], marker="s",
                  label=f"y ~ π_{{α=0}} (fixed), r = {entry['pearson_fixed']:.3f}")
        axis.set_xlabel("α")
        axis.set_ylabel("mean β·log π_α(y|x)/π_ref(y|x)")
        lam = points[0]["lambda"] if points else 0
        axis.set_title(titles.get(name, name) + (f" (λ = {lam:g})" if lam else ""), fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("Implicit reward vs α (cf. merging paper, Tab. 1)")
    return _save(figure, path, plt)


def _save(figure, path: Path, plt) -> Path:
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


# -- Markdown ------------------------------------------------------------------------------


def _pm(m: dict) -> str:
    return f"{m['mean']:.2f} ± {m['sem']:.2f}"


def markdown_tables(results: dict) -> str:
    """The tables of docs/reproduction.md, from a results.json."""
    lines = ["### DPO checkpoints with and without ExPO (test prompts)", ""]
    lines += [
        "| checkpoint | DPO steps | α (dev-best) | R without ExPO | length | R with ExPO "
        "| length |",
        "|---|---|---|---|---|---|---|",
    ]
    sft = results["test_sft"]
    lines.append(f"| SFT (θ₀) | 0 | – | {_pm(sft)} | {sft['length']:.1f} | – | – |")
    for entry in results["dpo"].values():
        plain, expo = entry["test_plain"], entry["test_expo"]
        lines.append(
            f"| DPO {entry['fraction']:.0%} | {entry['step']} | {entry['best_alpha']:g} | "
            f"{_pm(plain)} | {plain['length']:.1f} | {_pm(expo)} | {expo['length']:.1f} |"
        )
    lines += ["", "Where the reward comes from (test; mean words per answer, share over 12 words), "
              "and each checkpoint's weight step Δ = θ − θ₀ against the 100 % one:", ""]
    lines += [
        "| checkpoint | on-topic | bad | > 12 words | on-topic (ExPO) | bad (ExPO) "
        "| > 12 words (ExPO) | ‖Δ‖/‖Δ₁₀₀‖ | cos(Δ, Δ₁₀₀) | (1+α)‖Δ‖/‖Δ₁₀₀‖ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines.append(f"| SFT | {sft['on_topic']:.2f} | {sft['bad']:.2f} | {sft['over_length']:.0%} "
                 "| – | – | – | 0 | – | – |")
    geometry = results.get("dpo_geometry", {})
    for name, entry in results["dpo"].items():
        plain, expo = entry["test_plain"], entry["test_expo"]
        g = geometry.get(name, {"norm_ratio": float("nan"), "cosine": float("nan")})
        lines.append(
            f"| DPO {entry['fraction']:.0%} | {plain['on_topic']:.2f} | {plain['bad']:.2f} | "
            f"{plain['over_length']:.0%} | {expo['on_topic']:.2f} | {expo['bad']:.2f} | "
            f"{expo['over_length']:.0%} | {g['norm_ratio']:.3f} | {g['cosine']:.3f} | "
            f"{(1 + entry['best_alpha']) * g['norm_ratio']:.3f} |"
        )
    lines += ["", "### Reward and length vs α (dev prompts, the search's own numbers)", ""]
    first = next(iter(results["dpo"].values()))["dev_curve"]
    alphas = [p["alpha"] for p in first]
    lines.append("| checkpoint | " + " | ".join(f"α={a:g}" for a in alphas) + " |")
    lines.append("|---|" + "---|" * len(alphas))
    for entry in results["dpo"].values():
        by_alpha = {p["alpha"]: p for p in entry["dev_curve"]}
        cells = [
            f"{by_alpha[a]['mean']:.2f} ({by_alpha[a]['length']:.1f})" if a in by_alpha else "–"
            for a in alphas
        ]
        lines.append(f"| DPO {entry['fraction']:.0%} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: mean gold reward (mean length in words).", ""]

    it = results["iterative"]
    lines += ["### Iterative DPO: θ_T vs the (λ, α) merge (test prompts)", ""]
    lines += ["| model | R | length |", "|---|---|---|"]
    for index, m in enumerate(it["test_iterates"], start=1):
        lines.append(f"| θ{index} (iteration {index}) | {_pm(m)} | {m['length']:.1f} |")
    m = it["test_expo_only"]
    lines.append(f"| ExPO on θ_T (λ = 0, α = {it['best_alpha_lambda0']:g}) | {_pm(m)} | "
                 f"{m['length']:.1f} |")
    m = it["test_merged"]
    lines.append(f"| (λ, α) merge (λ = {it['best_lambda']:g}, α = {it['best_alpha']:g}) | "
                 f"{_pm(m)} | {m['length']:.1f} |")
    if "geometry" in it:
        lines += ["", "Weight steps Δ = θ − θ₀ of the iterates and of θ̄ (mean of θ₁…θ_{T−1}) "
                  "against θ_T's:", "", "| model | ‖Δ‖/‖Δ_T‖ | cos(Δ, Δ_T) |", "|---|---|---|"]
        for name, g in it["geometry"].items():
            lines.append(f"| {name} | {g['norm_ratio']:.3f} | {g['cosine']:.3f} |")
    lines += ["", "Dev reward over the (λ, α) grid:", ""]
    grid = it["dev_grid"]
    alphas = sorted({p["alpha"] for p in grid})
    value = {(p["lambda"], p["alpha"]): p["mean"] for p in grid}
    lines.append("| λ \\ α | " + " | ".join(f"{a:g}" for a in alphas) + " |")
    lines.append("|---|" + "---|" * len(alphas))
    for lam in sorted({p["lambda"] for p in grid}):
        lines.append(f"| {lam:g} | " + " | ".join(f"{value[(lam, a)]:.2f}" for a in alphas)
                     + " |")

    lines += ["", "### Implicit reward vs α", ""]
    lines += ["Pearson's r of the mean implicit reward with α, y ~ π_α (on-policy) unless noted:",
              "",
              "| setting | whole grid | α ≤ 1 | α ≤ gold peak | fixed y ~ π_{α=0} "
              "| on-policy vs gold R | grid | gold peak at α |",
              "|---|---|---|---|---|---|---|---|"]
    for name, entry in results["implicit"].items():
        alphas = [p["alpha"] for p in entry["points"]]
        lines.append(
            f"| {name} | {entry['pearson_on_policy']:.4f} | "
            f"{entry['pearson_on_policy_alpha_le_1']:.4f} | "
            f"{entry['pearson_on_policy_to_peak']:.4f} | {entry['pearson_fixed']:.4f} | "
            f"{entry['pearson_on_policy_vs_gold']:.4f} | {min(alphas):g}…{max(alphas):g} | "
            f"{entry['gold_peak_alpha']:g} |"
        )
    for name, entry in results["implicit"].items():
        lines += ["", f"{name}: α → mean implicit reward on-policy / fixed (gold R, length)", ""]
        lines += ["| α | on-policy | fixed | gold R | length |", "|---|---|---|---|---|"]
        for p in entry["points"]:
            lines.append(f"| {p['alpha']:g} | {p['implicit_reward_on_policy']:.3f} | "
                         f"{p['implicit_reward_fixed']:.3f} | {p['gold_reward']:.2f} | "
                         f"{p['length']:.1f} |")
    return "\n".join(lines) + "\n"
