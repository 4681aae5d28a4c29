"""What the output will be, known before the merge: its size against the free disk space, and
the chat template and generation config it will carry (mergekit copies θ₀'s tokenizer files)
against the aligned model's. Headers and small JSON files only; run at every expo merge's start
(``check.merge_start``) and by ``mergekit-expo check``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mergekit_expo.check.findings import Finding
from mergekit_expo.plan.headers import local_dir
from mergekit_expo.plan.types import Plan

# Room kept free beyond the output itself (model card, tokenizer, file system slack).
DISK_MARGIN = 1.05


def output_findings(config, out_path: str | os.PathLike) -> list[Finding]:
    """What forbids merging ``config`` into ``out_path``, known before anything is read: a file in
    its place, an input's folder (inputs are never written), another kind of artefact or files a
    loader reads that the new model would not replace (``output.folder``)."""
    from mergekit_expo.output.folder import write_problems
    from mergekit_expo.plan.scopes import local_inputs

    return [Finding("error", problem)
            for problem in write_problems(out_path, "model", local_inputs(config))]


def disk_findings(total: int, out_path: str | os.PathLike) -> tuple[tuple[Path, int], list]:
    """((the folder measured, its free bytes), an error if the output will not fit)."""
    existing = Path(os.path.abspath(out_path))
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    findings = []
    if free < total * DISK_MARGIN:
        findings.append(
            Finding(
                "error",
                f"not enough free disk space for the output: about {total / 1e9:.3g} GB needed "
                f"(+5 % margin), {free / 1e9:.3g} GB free for {Path(os.path.abspath(out_path))}",
            )
        )
    return (existing, free), findings


def _template(path: str | None) -> str | None:
    if path is None:
        return None
    folder = Path(path)
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8").strip()
    config = folder / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template.strip()
    return None


def _generation(path: str | None) -> dict | None:
    if path is None or not (Path(path) / "generation_config.json").exists():
        return None
    found = json.loads((Path(path) / "generation_config.json").read_text(encoding="utf-8"))
    ignored = {"transformers_version", "_from_model_config"}
    return {k: v for k, v in found.items() if k not in ignored}


def template_findings(plan: Plan) -> list[Finding]:
    """What the output carries (mergekit copies θ₀'s files) against the aligned model's."""
    config = plan.config
    if not plan.slices or config.base_model is None:
        return []
    base_dir, final_dir = local_dir(config.base_model), local_dir(plan.slices[-1].final)
    if base_dir is None or final_dir is None:
        return []
    source = config.tokenizer.source if config.tokenizer is not None else config.tokenizer_source
    if config.chat_template:
        return []  # the config chooses the template itself
    if source is None:
        carried_dir, generation = base_dir, _generation(base_dir)
    elif source in ("base", "union"):
        carried_dir, generation = base_dir, None
    else:
        carried_dir, generation = local_dir(source), None
    findings = []
    carried, wanted = _template(carried_dir), _template(final_dir)
    wanted_generation = _generation(final_dir)
    line = f'tokenizer: {{source: "{final_dir}"}}'
    if carried != wanted:
        findings.append(
            Finding(
                "warning",
                f"the output will carry the chat template of {carried_dir} "
                f"({'none' if carried is None else f'{len(carried)} characters'}), not the one "
                f"of the aligned model {final_dir} "
                f"({'none' if wanted is None else f'{len(wanted)} characters'}). For a drop-in "
                f"replacement of the aligned model add this line to the config: {line}",
            )
        )
    if generation != wanted_generation:
        copy = (
            f"cp {final_dir}/generation_config.json OUT/"
            if wanted_generation is not None else "remove OUT/generation_config.json"
        )
        have = "none" if generation is None else f"{base_dir}'s"
        want = "none" if wanted_generation is None else f"{final_dir}'s"
        findings.append(
            Finding(
                "warning",
                f"the output's generation_config.json ({have}) differs from the aligned "
                f"model's ({want}); mergekit has no config line for it: after merging, {copy}",
            )
        )
    return findings
