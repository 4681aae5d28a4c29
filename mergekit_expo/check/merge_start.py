"""The checks every expo merge runs at its start, and ``mergekit-expo check`` runs too.

Two steps, as mergekit gives us two moments: before it reads anything (the config, the input
paths and headers: ``before_read``) and once it has planned the merge (the plan's tensors, the
free disk space, the chat template: ``after_plan``). The merge raises every error of a step as
one message; ``check`` prints the same findings. Nothing here reads a tensor.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from mergekit_expo.check.config_values import config_findings
from mergekit_expo.check.findings import Finding, errors
from mergekit_expo.check.forecast import disk_findings, template_findings
from mergekit_expo.check.inputs import device_findings, input_findings, path_findings
from mergekit_expo.check.tensors import tensor_findings
from mergekit_expo.plan.build import PlanError, build_plan
from mergekit_expo.plan.config import uses_expo
from mergekit_expo.plan.types import Plan


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.level == "error" for f in findings)


def before_read(config: Any, options: Any) -> list[Finding]:
    """The config and its inputs' headers, before mergekit opens an input."""
    findings = config_findings(config)
    return findings + input_findings(config, options)


def after_plan(
    config: Any, tasks: Iterable[Any], out_path: str | os.PathLike | None
) -> tuple[Plan | None, list[Finding]]:
    """The plan built from the planner's ``tasks``, and what is wrong with it.

    ``out_path``: where the output goes (free disk space); None skips that check.
    """
    try:
        plan = build_plan(config, tasks=tasks)
    except PlanError as error:
        return None, errors(str(error).split("\n"))
    findings = tensor_findings(plan)
    if out_path is not None:
        findings += disk_findings(plan.output_bytes()[0], out_path)[1]
    return plan, findings + template_findings(plan)


def multimerge_steps(merge_configs: dict, merge_options: Any, intermediate_dir: str
                     ) -> list[tuple[str, list[Finding]]]:
    """(step name, findings) for every expo step of a ``mergekit-multi`` file, before the
    first runs: the config and the paths (an earlier step's output does not exist yet)."""
    steps = [name for name in merge_configs if name is not None]
    produced = [os.path.join(intermediate_dir, name) for name in steps]
    found = []
    for name, config in merge_configs.items():
        if uses_expo(config):
            findings = (config_findings(config) + path_findings(config, produced=produced)
                        + device_findings(merge_options))
            found.append((name or "(final, unnamed)", findings))
    return found
