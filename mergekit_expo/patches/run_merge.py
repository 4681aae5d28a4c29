"""``mergekit.merge.run_merge``: an expo merge is refused before anything is read when it needs
a lost feature or would write over an input or another kind of artefact, and writes into a
staging folder (``output.staging``) that moves into place only when complete."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType

from mergekit_expo.patches.apply import install_wrapper
from mergekit_expo.patches.record import Call, Internal

RUN_MERGE = Internal(
    "mergekit.merge", "run_merge",
    "expo merges write into the output folder in place: an interrupted merge can leave an "
    "incomplete or mixed model there",
    call=Call(("merge_config", "out_path", "options", "config_source"), forwards=True),
)
RECORDS = (RUN_MERGE,)


def install(merge: ModuleType) -> None:
    run_merge = install_wrapper(merge, RUN_MERGE, _staged)
    if run_merge is None:
        return
    for name in ("mergekit.scripts.run_yaml", "mergekit.scripts.multimerge"):
        holder = sys.modules.get(name)  # imported before us: holds the unwrapped function
        if holder is not None and hasattr(holder, "run_merge"):
            holder.run_merge = run_merge


def _staged(original: Callable) -> Callable:
    def run_merge(merge_config, out_path, options, config_source=None, *args, **kwargs):
        from mergekit_expo.plan.config import ConfigError, misspelt_method, uses_expo

        misspelt = misspelt_method(merge_config, "the config")
        if misspelt:  # mergekit would fail later with its own error on an unknown method
            raise ConfigError(misspelt)
        if not uses_expo(merge_config):
            return original(merge_config, out_path, options, config_source, *args, **kwargs)
        import torch

        from mergekit_expo.check.findings import raise_errors
        from mergekit_expo.check.forecast import output_findings
        from mergekit_expo.merge.rounding import rounding_into
        from mergekit_expo.output.console import lines_beside_bars
        from mergekit_expo.output.staging import staged
        from mergekit_expo.patches import reads
        from mergekit_expo.patches.card import merging
        from mergekit_expo.patches.record import refuse_lost
        from mergekit_expo.plan.dtypes import DtypeError, dtype_name

        refuse_lost(merge_config, verify=reads.RECORDS)
        try:  # the kernel rounds once into out_dtype
            out_name = dtype_name(merge_config.out_dtype, "out_dtype")
        except DtypeError:  # refused, with the right spelling, by the merge's start checks
            out_name = None
        out_dtype = getattr(torch, out_name) if out_name else None
        if config_source is None:  # before mergekit rewrites the config into slices
            config_source = merge_config.to_yaml()
        else:  # the config as written (mergekit-yaml): keys mergekit would drop are refused
            raise_errors(_top_level_keys(config_source))
        raise_errors(output_findings(merge_config, out_path))
        with lines_beside_bars(), merging(merge_config), rounding_into(out_dtype), \
                staged(out_path) as staging:
            result = original(merge_config, staging, options, config_source, *args, **kwargs)
        reads.forget_loaders(out_path)
        return result

    return run_merge


def _top_level_keys(config_source: str) -> list:
    """Top-level keys of the config as written that mergekit would drop (``paramters:``)."""
    import yaml

    from mergekit_expo.check.findings import errors
    from mergekit_expo.plan.config import unknown_top_level_keys

    raw = yaml.safe_load(config_source)
    return errors(unknown_top_level_keys(raw, "the config")) if isinstance(raw, dict) else []
