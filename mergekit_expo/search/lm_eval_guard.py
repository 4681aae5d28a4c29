"""lm-evaluation-harness on the candidate in memory: ``--guard lm-eval:TASKS`` and
``--scorer lm-eval:TASKS``.

The candidate is handed to lm-eval as it is: the transformers model as ``HFLM(pretrained=model)``,
the running vLLM engine through :class:`~mergekit_expo.search.lm_eval_vllm.EngineLM` (lm-eval's
own vLLM model class over the search's engine). No model is written, loaded or started.
``--lm-eval-args`` pass through to ``lm_eval.simple_evaluate`` (``limit``, ``num_fewshot``, ...),
except ``include_path``, a folder of task YAMLs given to lm-eval's ``TaskManager`` (local tasks;
with ``HF_DATASETS_OFFLINE=1`` nothing is fetched), and ``metric``. The score per document is the
task's first metric (or ``metric``); the candidate's score is their mean over every document of
every task.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergekit_expo.search.merge_config import SearchConfigError
from mergekit_expo.search.scorers import Scores

OWN_KEYS = {"include_path", "metric"}  # read here; the rest goes to simple_evaluate


class LmEvalTasks:
    """lm-eval tasks, run on a transformers model or on the search's vLLM engine."""

    def __init__(self, tasks: str, args: dict[str, Any] | None, *, flag: str, batch_size: int):
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise SearchConfigError(f"{flag} lm-eval: lm-eval is not installed; "
                                    "pip install 'mergekit-expo[lm-eval]'")
        self.tasks = [t for t in tasks.split(",") if t]
        if not self.tasks:
            raise SearchConfigError(f"{flag} lm-eval:TASKS names no task (e.g. lm-eval:arc_easy)")
        self.flag, self.args, self.batch_size = flag, dict(args or {}), batch_size

    def identity(self) -> dict[str, Any]:
        import lm_eval

        return {"kind": "lm-eval", "tasks": self.tasks, "args": self.args,
                "lm_eval": getattr(lm_eval, "__version__", None)}

    def run(self, model, tokenizer) -> Scores:
        import lm_eval

        lm = self._model(model, tokenizer)
        passed = {k: v for k, v in self.args.items() if k not in OWN_KEYS}
        manager = task_manager(self.args.get("include_path"), self.tasks)
        result = lm_eval.simple_evaluate(model=lm, tasks=self.tasks, task_manager=manager,
                                         log_samples=True, **passed)
        values: list[float] = []
        for task in self.tasks:
            samples = result["samples"].get(task, [])
            metric = self.args.get("metric") or _first_metric(result["results"][task])
            values += [float(sample[metric]) for sample in samples]
        if not values:
            raise SearchConfigError(f"{self.flag} lm-eval:{','.join(self.tasks)} scored no "
                                    "document")
        return Scores(values)

    def _model(self, model, tokenizer):
        if hasattr(model, "llm"):  # the search's VllmEngine: its running vllm.LLM, as it is
            from mergekit_expo.search.lm_eval_vllm import EngineLM

            return EngineLM(model.llm, tokenizer, batch_size=self.batch_size)
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)


class LmEvalGuard:
    """``--guard lm-eval:TASKS``: the tasks' metric on the candidate, as its guard."""

    needs_responses = False
    runs_on_vllm = True  # the engine computes the log-likelihoods lm-eval asks for

    def __init__(self, tasks: str, args: dict[str, Any] | None = None, *, batch_size: int = 8):
        self.tasks = LmEvalTasks(tasks, args, flag="--guard", batch_size=batch_size)
        self.tokenizer = None

    def identity(self) -> dict[str, Any]:
        return {"guard": self.tasks.identity()}

    def prepare(self, tokenizer, chat: bool, *, progress: bool = True) -> None:
        self.tokenizer = tokenizer

    def score(self, model, prompts, responses, *, progress: bool = True) -> Scores:
        return self.tasks.run(model, self.tokenizer)


class LmEvalScorer:
    """``--scorer lm-eval:TASKS``: the tasks' metric on the candidate, as its score (no prompts
    are sampled)."""

    generates = False
    runs_on_vllm = True

    def __init__(self, tasks: str, args: dict[str, Any] | None = None, *, batch_size: int = 8):
        self.tasks = LmEvalTasks(tasks, args, flag="--scorer", batch_size=batch_size)
        self.tokenizer = None

    def identity(self) -> dict[str, Any]:
        return self.tasks.identity()

    def prepare(self, weights, tokenizer, chat: bool, *, progress: bool = True) -> None:
        self.tokenizer = tokenizer

    def evaluate(self, model, *, progress: bool = True) -> Scores:
        return self.tasks.run(model, self.tokenizer)


def task_manager(include_path: str | Path | list | tuple | None, tasks: Sequence[str] = ()):
    """lm-eval's ``TaskManager`` for ``tasks``, made once per process for as long as the YAML
    files under ``include_path`` stay as they are: a search runs the tasks on every candidate,
    as its scorer and as its guard. Where every one of ``tasks`` is a plain task (not a group or
    tag) of ``include_path``, the manager indexes only ``include_path``, as it would resolve
    them anyway (``include_path`` takes precedence); otherwise it also indexes every task YAML
    lm-eval ships (thousands of files: seconds of CPU)."""
    paths = include_path if isinstance(include_path, (list, tuple)) else [include_path]
    paths = tuple(str(p) for p in paths if p)
    return _task_manager(paths, tuple(sorted(set(tasks))),
                         tuple(_yaml_files(Path(p)) for p in paths))


def _yaml_files(root: Path) -> tuple[tuple[str, int], ...]:
    """The task YAMLs under ``root`` (or ``root`` itself) with their modification times."""
    files = sorted(root.rglob("*.y*ml")) if root.is_dir() else [root] if root.exists() else []
    return tuple((str(f), f.stat().st_mtime_ns) for f in files)


@functools.lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], tasks: tuple[str, ...], state: tuple) -> Any:
    """``state`` (the YAML files' names and mtimes) is only part of the cache key."""
    from lm_eval.tasks import TaskManager

    if paths and tasks:
        local = TaskManager(include_path=list(paths), include_defaults=False)
        if local_tasks_suffice(local, tasks):
            return local
    return TaskManager(include_path=list(paths) or None)


def local_tasks_suffice(manager: Any, tasks: Sequence[str]) -> bool:
    """Whether every one of ``tasks`` is a plain task in ``manager``'s index (a group or tag may
    name lm-eval's own tasks among its members)."""
    return bool(tasks) and set(tasks) <= set(manager.all_subtasks)


def _first_metric(summary: dict[str, Any]) -> str:
    """``acc`` from lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}``."""
    for key in summary:
        name = key.split(",")[0]
        if name != "alias" and not name.endswith("_stderr") and "," in key:
            return name
    raise SearchConfigError(f"lm-eval reported no metric ({sorted(summary)})")
