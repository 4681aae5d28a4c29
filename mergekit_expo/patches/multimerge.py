"""``mergekit.scripts.multimerge``: every expo step of a ``mergekit-multi`` file is checked before
the first one runs (``make_tasks``), and a lazy run merges again an expo step whose folder holds
a model merged from another config (``MergeModelTask.execute``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import ModuleType

from mergekit_expo.patches.apply import install_wrapper
from mergekit_expo.patches.record import Call, Internal

LOG = logging.getLogger("mergekit_expo")

MAKE_TASKS = Internal(
    "mergekit.scripts.multimerge", "make_tasks",
    "mergekit-multi steps are checked only when each one starts",
    call=Call(("merge_configs", "dependencies", "merge_options", "intermediate_dir"),
              forwards=True),
)
MERGE_MODEL_TASK = Internal(
    "mergekit.scripts.multimerge", "MergeModelTask.execute",
    "mergekit-multi skips an expo step whose folder holds a model merged from another config",
    call=Call(("self",), forwards=True), fields=("config_yaml", "out_path", "lazy", "name"),
)
RECORDS = (MAKE_TASKS, MERGE_MODEL_TASK)


def install(multimerge: ModuleType) -> None:
    install_wrapper(multimerge, MAKE_TASKS, _validating_steps_first)
    install_wrapper(multimerge, MERGE_MODEL_TASK, _rerunning_stale_steps)


def _validating_steps_first(original: Callable) -> Callable:
    def make_tasks(merge_configs, dependencies, merge_options, intermediate_dir, *args,
                   **kwargs):
        from mergekit_expo.check.findings import raise_errors
        from mergekit_expo.check.merge_start import multimerge_steps

        for name, findings in multimerge_steps(merge_configs, merge_options, intermediate_dir):
            raise_errors(findings, context=f"mergekit-multi step {name}")
        return original(merge_configs, dependencies, merge_options, intermediate_dir, *args,
                        **kwargs)

    return make_tasks


def _rerunning_stale_steps(original: Callable) -> Callable:
    def execute(self, *args, **kwargs):
        if self.lazy and _stale_expo_step(self.config_yaml, self.out_path):
            LOG.warning(
                "mergekit-multi step %s: %s holds a model merged from another config; "
                "merging it again", self.name, self.out_path,
            )
            return original(self.model_copy(update={"lazy": False}), *args, **kwargs)
        return original(self, *args, **kwargs)

    return execute


def _stale_expo_step(config_yaml: str, out_path: str) -> bool:
    """The step's folder holds a model whose ``mergekit_config.yml`` is not this step's config.

    mergekit-multi calls ``run_merge`` without the config's text; the ``run_merge`` patch then
    passes ``MergeConfiguration.to_yaml()`` of the config as given (mergekit would write it after
    rewriting models into slices). Without a model card there is nothing to compare and
    mergekit's own rule (a config.json and weights mean done) stands.
    """
    import yaml

    from mergekit_expo.plan.build import load
    from mergekit_expo.plan.config import uses_expo

    written = os.path.join(out_path, "mergekit_config.yml")
    if not os.path.exists(os.path.join(out_path, "config.json")) or not os.path.exists(written):
        return False
    config = load(yaml.safe_load(config_yaml))  # the plan's reading of the step
    if not uses_expo(config):
        return False
    with open(written, encoding="utf-8") as handle:
        return handle.read() != config.to_yaml()
