"""Mistakes about the inputs, found from paths and safetensors headers (no tensor read).

Local paths that do not exist (mergekit would say "Repo id must be in the form"), ``--cuda``
without CUDA, damaged checkpoint files (named), mixed input dtypes without ``dtype:``, and
embeddings tied in some inputs only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from mergekit_expo.check.findings import Finding
from mergekit_expo.plan.dtypes import is_float, promote
from mergekit_expo.plan.headers import TensorHeader, looks_local, read_model_headers
from mergekit_expo.plan.scopes import model_places


def path_findings(config: Any, *, produced: Iterable[str] = ()) -> list[Finding]:
    """Local model paths that do not exist; ``produced``: folders an earlier step will write."""
    produced = {os.path.normpath(p) for p in produced}
    findings, seen = [], set()
    for where, reference in model_places(config):
        for path, what in ((reference.model.path, "model path"),
                           (reference.lora.path if reference.lora else None, "LoRA adapter")):
            if path is None or (path, where) in seen:
                continue
            seen.add((path, where))
            if os.path.normpath(path) in produced or not looks_local(path):
                continue
            if not os.path.exists(os.path.expanduser(path)):
                findings.append(
                    Finding(
                        "error",
                        f"{what} {path} does not exist ({where}). Check the path; a Hugging "
                        "Face model is written as org/name.",
                    )
                )
    return findings


def device_findings(options: Any) -> list[Finding]:
    """``--cuda`` / ``--device cuda`` where torch sees no CUDA device."""
    device = str(getattr(options, "device", None) or "cpu")
    if not device.startswith("cuda"):
        return []
    import torch

    if torch.cuda.is_available():
        return []
    why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
    return [
        Finding(
            "error",
            f"--cuda / --device {device} was given, but CUDA is not available ({why}; torch "
            f"{torch.__version__}). Drop --cuda (or use --device cpu) to merge on the CPU.",
        )
    ]


def read_inputs(config: Any) -> tuple[dict[Any, dict[str, TensorHeader]], list[Finding]]:
    """The safetensors headers of every local input; a damaged file is an error naming it."""
    headers, damaged = read_model_headers(config)
    return headers, [Finding("error", message) for _, message in damaged]


def header_findings(config: Any, headers: dict[Any, dict[str, TensorHeader]]) -> list[Finding]:
    """Mixed input dtypes without ``dtype:``; embeddings tied in some inputs only."""
    findings = []
    if config.dtype is None and len(headers) > 1:
        dtypes = {str(model): _dominant(tensors.values()) for model, tensors in headers.items()}
        distinct = set(dtypes.values()) - {None}
        if len(distinct) > 1:
            promoted = promote(sorted(distinct))
            written = config.out_dtype or promoted
            findings.append(
                Finding(
                    "warning",
                    f"expo: the inputs have different dtypes ({dtypes}) and the config sets no "
                    f"`dtype:`: mergekit computes each tensor in the common dtype {promoted} "
                    f"and writes {written}. Write `dtype:` and `out_dtype:` to choose (e.g. "
                    "`out_dtype: bfloat16`).",
                )
            )
    untied = {str(m): any(n.endswith("lm_head.weight") for n in t) for m, t in headers.items()}
    if len(set(untied.values())) > 1:
        with_head = [m for m, has in untied.items() if has]
        without = [m for m, has in untied.items() if not has]
        findings.append(
            Finding(
                "error",
                f"expo: the inputs disagree on tied embeddings: {with_head} have their own "
                f"lm_head.weight, {without} tie it to the embeddings (no lm_head.weight). "
                "Extrapolating between them is not defined per tensor. Save every input the "
                "same way (e.g. untie: load with transformers and save with "
                "tie_word_embeddings=False) and merge again.",
            )
        )
    return findings


def _dominant(tensors: Iterable[TensorHeader]) -> str | None:
    counts: dict[str, int] = {}
    for tensor in tensors:
        if is_float(tensor.dtype):
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel
    return max(counts, key=counts.get) if counts else None


def input_findings(config: Any, options: Any) -> list[Finding]:
    """Everything checkable before mergekit opens the inputs, reading headers only."""
    findings = path_findings(config) + device_findings(options)
    if any(f.level == "error" for f in findings):
        return findings
    headers, damaged = read_inputs(config)
    return findings + damaged + header_findings(config, headers)
