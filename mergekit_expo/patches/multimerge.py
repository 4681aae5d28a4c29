"""``mergekit.scripts.multimerge``: every expo step of a ``mergekit-multi`` file is checked before
the first one runs (``load_config``: its top-level keys, as written; ``make_tasks``: the rest); a
lazy run merges again an expo step whose folder holds a model merged from another config, and
then every later step that reads a step merged in this run (``MergeModelTask.execute``); a
refusal prints as one block (``main``)."""

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
LOAD_CONFIG = Internal(
    "mergekit.scripts.multimerge", "load_config",
    "unknown top-level keys of mergekit-multi expo steps are dropped silently",
    call=Call(("config_source", "intermediate_dir"), forwards=True),
)
MAIN = Internal(
    "mergekit.scripts.multimerge", "main.callback",
    "mergekit-multi prints mergekit-expo's refusals as tracebacks",
    call=Call(forwards=True),
)
RECORDS = (MAKE_TASKS, MERGE_MODEL_TASK, LOAD_CONFIG, MAIN)


def install(multimerge: ModuleType) -> None:
    from mergekit_expo.patches.run_yaml import one_block

    install_wrapper(multimerge, MAKE_TASKS, _validating_steps_first)
    install_wrapper(multimerge, MERGE_MODEL_TASK, _rerunning_stale_steps)
    install_wrapper(multimerge, LOAD_CONFIG, _checking_top_level_keys)
    install_wrapper(multimerge, MAIN, one_block("mergekit-multi"))


def _checking_top_level_keys(original: Callable) -> Callable:
    def load_config(config_source, intermediate_dir, *args, **kwargs):
        import yaml

        from mergekit_expo.check.findings import ExpoConfigError
        from mergekit_expo.plan.config import unknown_top_level_keys, uses_expo

        problems = []
        docs = yaml.safe_load_all(config_source) if isinstance(config_source, str) else ()
        for doc in docs:
            if isinstance(doc, dict) and uses_expo(doc):
                step = doc.get("name", "final merge")
                known = {k: v for k, v in doc.items() if k != "name"}
                problems += unknown_top_level_keys(known, f"mergekit-multi step {step}")
        if problems:
            raise ExpoConfigError("\n".join(problems))
        return original(config_source, intermediate_dir, *args, **kwargs)

    return load_config


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


class MergedNow(str):
    """A step's output folder, as the step returns it to the steps that read it, when the step
    was merged in this run (not skipped): those steps are then merged again too."""

    expo: bool = False  # the step is an expo merge


def _rerunning_stale_steps(original: Callable) -> Callable:
    def execute(self, *args, **kwargs):
        redo = self
        fresh = sorted(k for k, v in kwargs.items() if isinstance(v, MergedNow))
        if self.lazy and fresh and _done(self.out_path) and _involves_expo(self.config_yaml,
                                                                            kwargs):
            LOG.warning(
                "mergekit-multi step %s: merging it again, as %s was merged in this run",
                self.name, ", ".join(fresh),
            )
            redo = self.model_copy(update={"lazy": False})
        elif self.lazy and _stale_expo_step(self.config_yaml, self.out_path):
            LOG.warning(
                "mergekit-multi step %s: %s holds a model merged from another config; "
                "merging it again", self.name, self.out_path,
            )
            redo = self.model_copy(update={"lazy": False})
        skipped = redo.lazy and _done(redo.out_path)
        result = original(redo, *args, **kwargs)
        if skipped or not isinstance(result, str):
            return result
        merged = MergedNow(result)
        merged.expo = _is_expo(self.config_yaml)
        return merged

    return execute


def _done(out_path: str) -> bool:
    """mergekit's own rule for a lazy step to be skipped: a config.json and weights."""
    from mergekit.scripts.multimerge import MODEL_CHECK_FILENAMES

    return os.path.exists(os.path.join(out_path, "config.json")) and any(
        os.path.exists(os.path.join(out_path, name)) for name in MODEL_CHECK_FILENAMES
    )


def _is_expo(config_yaml: str) -> bool:
    import yaml

    from mergekit_expo.plan.config import uses_expo

    return uses_expo(yaml.safe_load(config_yaml))


def _involves_expo(config_yaml: str, inputs: dict) -> bool:
    """This step, or a step it reads that was merged now, is an expo merge (other multi files
    behave as mergekit has them)."""
    return _is_expo(config_yaml) or any(getattr(v, "expo", False) for v in inputs.values())


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
