"""Everything that can be known about an expo merge before running it, in seconds.

The checks that cost no weight reads are the ones every expo merge runs at its start
(``mergekit_expo.merge.validation``, hooked into mergekit); this module runs them without
stopping at the first error, plans the merge with mergekit's own planner (nothing is read or
written), and adds what only a preflight can afford: a relatedness figure on a few rows of a few
tensors (the only weight reads), the free disk space against the output size, and the chat
template and generation config the output will carry compared with the aligned model's.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_expo.merge.forecast import disk_findings, output_bytes, template_findings
from mergekit_expo.merge.headers import TensorHeader
from mergekit_expo.merge.parameters import DEFAULT_WARN_RELATIVE_CHANGE
from mergekit_expo.merge.roles import slice_roles
from mergekit_expo.merge.validation import (
    Finding,
    config_findings,
    device_findings,
    header_findings,
    path_findings,
    plan_findings,
    planned_tensors,
    read_inputs,
    uses_expo,
)

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


def run_check(config_path: Path, out_path: Path | None, *, device: str = "cpu") -> Report:
    """Check an expo config; the report lists what the merge will do and what is wrong."""
    report = Report()
    config = _load_config(config_path, report)
    if config is None:
        return report
    from mergekit.options import MergeOptions

    options = MergeOptions(device=device)
    missing = path_findings(config)
    report.findings += config_findings(config) + missing + device_findings(options)
    if missing:
        return report  # mergekit could not even read the models' configs
    headers, damaged = read_inputs(config)
    report.findings += damaged + header_findings(config, headers)
    _roles(config, report)
    if damaged:
        return report
    planned = _plan(config, options, headers, report)
    _relatedness(config, headers, report)
    if planned is not None:
        _disk(config, planned, headers, out_path, report)
    report.findings += template_findings(config)
    return report


def _load_config(path: Path, report: Report):
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        report.findings.append(Finding("error", f"{path} is not valid YAML: {error}"))
        return None
    if not isinstance(raw, dict):
        report.findings.append(Finding("error", f"{path} does not hold a merge config mapping"))
        return None
    known = set(MergeConfiguration.model_fields)
    for key in raw:
        if key not in known:  # mergekit drops unknown top-level keys without a word
            match = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean `{match[0]}`?" if match else ""
            report.findings.append(
                Finding("error", f"unknown top-level key `{key}` in {path}{hint}")
            )
    try:
        config = MergeConfiguration.model_validate(raw)
    except (ValidationError, RuntimeError, ValueError) as error:
        report.findings.append(Finding("error", f"{path}: mergekit refuses this config: {error}"))
        return None
    if not uses_expo(config):
        report.findings.append(
            Finding(
                "error",
                f"{path} uses merge_method: {config.merge_method}; mergekit-expo check checks "
                "expo configs",
            )
        )
        return None
    return config


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if hasattr(value, "model_dump"):
        return json.dumps(value.model_dump(exclude_none=True))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _roles(config, report: Report) -> None:
    for roles in slice_roles(config):
        report.lines.append(
            f"{roles['where']}: θ₀ = {roles['reference']}; θ_T = {roles['final']}; "
            f"intermediates = {roles['intermediates'] or 'none'}; "
            f"alpha = {_show(roles['alpha'])}; lambda = {_show(roles['lambda'])}"
        )


def _plan(config, options, headers, report: Report):
    """mergekit's own plan of the merge (reads configs and headers, no tensor)."""
    from mergekit import architecture
    from mergekit import merge as mergekit_merge
    from mergekit.io.tasks import LoaderCache
    from mergekit.plan import MergePlanner

    work = config.model_copy(deep=True)
    get_info = getattr(architecture.get_architecture_info, "__wrapped__",
                       architecture.get_architecture_info)  # ours would stop at an error
    try:
        arch_info = get_info(work, options)
        LoaderCache().setup(options=options)
        out_config = mergekit_merge._model_out_config(
            work, arch_info, trust_remote_code=options.trust_remote_code
        )
        planner = MergePlanner(work, arch_info, options=options, out_model_config=out_config)
        plan_to_disk = getattr(MergePlanner.plan_to_disk, "__wrapped__", MergePlanner.plan_to_disk)
        # builds the task graph only; its writer task would create the folder when executed
        planned = planned_tensors(plan_to_disk(planner, out_path="(not written)"))
    except Exception as error:  # noqa: BLE001 - report what mergekit would fail on
        report.findings.append(
            Finding("error", f"mergekit cannot plan this merge: {type(error).__name__}: {error}")
        )
        return None
    names = {
        model: (headers[model].keys() if model in headers
                else LoaderCache().get(model).index.tensor_paths.keys())
        for model in config.referenced_models()
    }
    report.findings += plan_findings(config, planned, names)
    report.lines.append(f"output: {len(planned)} tensors planned")
    return planned


def _sample_rows(header: TensorHeader, rows: list[int]):
    import torch
    from safetensors import safe_open

    with safe_open(str(header.file), "pt") as handle:
        piece = handle.get_slice(header.name)
        return torch.cat([piece[r : r + 1] for r in rows]).double()


def _relatedness(config, headers, report: Report) -> None:
    """‖θ_T − θ₀‖ / ‖θ₀‖ on a few rows of a few weight matrices, per model against θ₀."""
    import torch

    threshold = (config.parameters or {}).get("warn_relative_change")
    if not isinstance(threshold, (int, float)):
        threshold = DEFAULT_WARN_RELATIVE_CHANGE
    by_path = {str(model): model for model in headers}
    done = set()
    for roles in slice_roles(config):
        reference = by_path.get(roles["reference"])
        for other in (roles["final"], *roles["intermediates"]):
            model = by_path.get(other)
            if reference is None or model is None or (reference, model) in done:
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


def _disk(config, planned, headers, out_path: Path | None, report: Report) -> None:
    total, unknown = output_bytes(config, planned, headers)
    partial = f" (without {unknown} planned tensors not in local headers)" if unknown else ""
    report.lines.append(f"estimated output size: {total / 1e9:.3g} GB{partial}")
    if out_path is None:
        report.lines.append("free disk space: not checked (give OUT_PATH)")
        return
    free, findings = disk_findings(total, out_path)
    report.lines.append(f"free disk space at {free[0]}: {free[1] / 1e9:.3g} GB")
    report.findings += findings
