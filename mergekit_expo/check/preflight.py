"""Everything that can be known about an expo merge before running it, in seconds.

``run_check`` runs the checks every expo merge runs at its start (``check.merge_start``: the
config, the inputs' headers, then mergekit's own plan of the merge), without stopping at the
first error, and adds what only a preflight can afford: top-level keys mergekit would drop (from
the raw YAML) and a relatedness figure on a few rows of a few tensors (the only weight reads).
Whatever it finds is reported as a finding naming the file or key, never a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_expo.check.findings import Finding, errors
from mergekit_expo.check.forecast import disk_findings, output_findings
from mergekit_expo.check.merge_start import after_plan, before_read, has_errors
from mergekit_expo.merge.parameters import DEFAULT_WARN_RELATIVE_CHANGE
from mergekit_expo.patches.reads import RECORDS as READS
from mergekit_expo.patches.record import lost_for
from mergekit_expo.plan import config as config_io
from mergekit_expo.plan.build import plan_config
from mergekit_expo.plan.headers import TensorHeader
from mergekit_expo.plan.scopes import model_places
from mergekit_expo.plan.types import Plan

# Rows read per tensor and tensors per model pair for the relatedness figure: a few KB per
# model, enough to tell a DPO-sized move (~1e-3..5e-2 of the norm) from an unrelated model (~1.4).
SAMPLE_ROWS = 8
SAMPLE_TENSORS = 4


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)  # what the merge will do
    findings: list[Finding] = field(default_factory=list)

    def errors(self) -> list[str]:
        return [f.message for f in self.findings if f.level == "error"]

    def warnings(self) -> list[str]:
        return [f.message for f in self.findings if f.level == "warning"]


def run_check(config_path: Path, out_path: Path | None, *, device: str = "cpu",
              lora_merge_cache: str | None = None) -> Report:
    """Check an expo config; the report lists what the merge will do and what is wrong."""
    report = Report()
    try:
        _check(report, Path(config_path), out_path, device, lora_merge_cache)
    except config_io.ConfigError as error:
        report.findings.append(Finding("error", str(error)))
    except Exception as error:  # noqa: BLE001 - a finding, never a traceback
        report.findings.append(
            Finding("error", f"{config_path}: cannot check this config "
                             f"({type(error).__name__}: {error})")
        )
    return report


def _check(report: Report, path: Path, out_path, device: str, cache: str | None) -> None:
    from mergekit.options import MergeOptions

    raw = config_io.read_raw(path)
    misspelt = config_io.misspelt_method(raw, str(path))
    if misspelt:
        report.findings.append(Finding("error", misspelt))
        return
    report.findings += errors(config_io.unknown_top_level_keys(raw, str(path)))
    config = config_io.validate(raw, str(path))
    if not config_io.uses_expo(config):
        report.findings.append(Finding(
            "error",
            f"{path} uses merge_method: {config.merge_method}; mergekit-expo check checks expo "
            "configs",
        ))
        return
    import mergekit.merge  # noqa: F401 - what a merge imports: the patches install, or say why not

    options = MergeOptions(device=device, lora_merge_cache=cache)
    report.findings += errors(lost_for(config, READS))  # as the merge refuses first
    if out_path is not None:
        report.findings += output_findings(config, out_path)
    report.findings += before_read(config, options)
    if has_errors(report.findings):
        _roles_if_possible(config, report)
        return
    adapters = sorted({str(m) for _, m in model_places(config) if m.lora is not None})
    if adapters and not cache:
        report.findings.append(Finding(
            "error",
            f"{path}: inputs given as BASE+ADAPTER ({', '.join(adapters)}) are merged into full "
            "models before the merge reads them: give --lora-merge-cache DIR, as mergekit-yaml "
            "needs it (check merges each adapter into DIR once; the merge with the same DIR "
            "reuses it)",
        ))
        _roles_if_possible(config, report)
        return
    plan = _plan(config, options, out_path, report)
    _roles(plan or plan_config(config), report)
    if plan is None:
        return
    _relatedness(plan, report)
    _disk(plan, out_path, report)


def _roles_if_possible(config, report: Report) -> None:
    try:
        _roles(plan_config(config), report)
    except ValueError:
        pass  # the findings say why


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if hasattr(value, "model_dump"):
        return json.dumps(value.model_dump(exclude_none=True))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _roles(plan: Plan, report: Report) -> None:
    for piece in plan.slices:
        report.lines.append(
            f"{piece.where}: θ₀ = {piece.reference}; θ_T = {piece.final}; "
            f"intermediates = {[str(m) for m in piece.intermediates] or 'none'}; "
            f"alpha = {_show(piece.alpha)}; lambda = {_show(piece.lam)}"
        )
    if plan.dtype or plan.out_dtype:
        computed = plan.dtype or "each tensor's inputs' common dtype"
        report.lines.append(f"dtype: {computed}; out_dtype: {plan.out_dtype or 'as computed'}")


def _plan(config, options, out_path, report: Report) -> Plan | None:
    """mergekit's own plan of the merge (reads configs and headers, no tensor), checked as the
    merge checks it at its start."""
    from mergekit_expo.plan.tasks import planned_tasks

    try:
        tasks = planned_tasks(config, options)
    except Exception as error:  # noqa: BLE001 - report what mergekit would fail on
        report.findings.append(
            Finding("error", f"mergekit cannot plan this merge: {type(error).__name__}: {error}")
        )
        return None
    plan, findings = after_plan(config, tasks, out_path)
    report.findings += findings
    if plan is not None:
        report.lines.append(f"output: {len(plan.tensors)} tensors planned")
        _tensor_summary(plan, report)
    return plan


def _tensor_summary(plan: Plan, report: Report) -> None:
    """The α, λ and dtypes mergekit resolved per tensor, grouped by value."""
    groups: dict[tuple, int] = {}
    for tensor in plan.tensors:
        key = (tensor.alpha, tensor.lam, tensor.working_dtype, tensor.output_dtype)
        groups[key] = groups.get(key, 0) + 1
    for (alpha, lam, working, written), count in sorted(groups.items(), key=str):
        report.lines.append(
            f"{count} tensors: alpha = {alpha:g}, lambda = {lam:g}, computed in "
            f"{working or 'copied'}, written as {written}"
        )


def _sample_rows(header: TensorHeader, rows: list[int]):
    import torch
    from safetensors import safe_open

    with safe_open(str(header.file), "pt") as handle:
        piece = handle.get_slice(header.name)
        return torch.cat([piece[r : r + 1] for r in rows]).double()


def _relatedness(plan: Plan, report: Report) -> None:
    """‖θ − θ₀‖ / ‖θ₀‖ on a few rows of a few weight matrices, per model against θ₀."""
    import torch

    headers, done = plan.headers, set()
    for piece in plan.slices:
        threshold = piece.warn_relative_change
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            threshold = DEFAULT_WARN_RELATIVE_CHANGE  # a filter list: the default's figure
        reference = piece.reference
        for model in (piece.final, *piece.intermediates):
            if reference not in headers or model not in headers or (reference, model) in done:
                continue
            done.add((reference, model))
            ref, mine = headers[reference], headers[model]
            matrices = sorted(
                n for n, h in mine.items()
                if len(h.shape) == 2 and n in ref and ref[n].shape == h.shape
                and h.dtype.startswith(("float", "bfloat"))
            )
            if not matrices:
                continue
            step = max(1, len(matrices) // SAMPLE_TENSORS)
            delta = norm = 0.0
            for name in matrices[::step][:SAMPLE_TENSORS]:
                count = ref[name].shape[0]
                rows = sorted({i * count // SAMPLE_ROWS for i in range(SAMPLE_ROWS)})
                base = _sample_rows(ref[name], rows)
                delta += float(torch.sum((_sample_rows(mine[name], rows) - base) ** 2))
                norm += float(torch.sum(base**2))
            change = (delta / norm) ** 0.5 if norm else float("nan")
            report.lines.append(
                f"relatedness ‖θ − θ₀‖/‖θ₀‖ of {model} (sampled rows): {change:.3g}"
            )
            if change > threshold:
                report.findings.append(
                    Finding(
                        "warning",
                        f"{model} differs from θ₀ {reference} by {change:.3g} of its norm on "
                        f"sampled rows (threshold {threshold:g}; SFT→DPO moves are typically "
                        "below 0.05): probably not an SFT→aligned pair; extrapolating between "
                        "unrelated checkpoints collapses the model",
                    )
                )


def _disk(plan: Plan, out_path: Path | None, report: Report) -> None:
    total, unknown = plan.output_bytes()
    partial = f" (without {unknown} planned tensors not in local headers)" if unknown else ""
    report.lines.append(f"estimated output size: {total / 1e9:.3g} GB{partial}")
    if out_path is None:
        report.lines.append("free disk space: not checked (give OUT_PATH)")
        return
    free, _ = disk_findings(total, out_path)  # the finding itself comes from after_plan
    report.lines.append(f"free disk space at {free[0]}: {free[1] / 1e9:.3g} GB")
