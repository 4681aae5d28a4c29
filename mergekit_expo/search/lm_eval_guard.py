"""``--guard lm-eval:TASKS``: lm-evaluation-harness on the candidate in memory, as the guard.

The candidate's transformers model is handed to lm-eval as it is (``HFLM(pretrained=model)``):
no model is written or loaded. ``--lm-eval-args`` pass through to ``lm_eval.simple_evaluate``
(``limit``, ``num_fewshot``, ...), except ``include_path``, a folder of task YAMLs given to
lm-eval's ``TaskManager`` (local tasks; with ``HF_DATASETS_OFFLINE=1`` nothing is fetched). The
guard's score per document is the task's first metric (or ``metric``), averaged over every
document of every task.
"""

from __future__ import annotations

from typing import Any

from mergekit_expo.search.merge_config import SearchConfigError
from mergekit_expo.search.scorers import Scores

OWN_KEYS = {"include_path", "metric"}  # read here; the rest goes to simple_evaluate


class LmEvalGuard:
    """lm-eval tasks on the candidate (transformers engine)."""

    needs_responses = False

    def __init__(self, tasks: str, args: dict[str, Any] | None = None, *, batch_size: int = 8):
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise SearchConfigError("--guard lm-eval: lm-eval is not installed; "
                                    "pip install 'mergekit-expo[lm-eval]'")
        self.tasks = [t for t in tasks.split(",") if t]
        if not self.tasks:
            raise SearchConfigError("--guard lm-eval:TASKS names no task (e.g. lm-eval:arc_easy)")
        self.args = dict(args or {})
        self.batch_size = batch_size
        self.tokenizer = None

    def identity(self) -> dict[str, Any]:
        import lm_eval

        version = getattr(lm_eval, "__version__", None)
        return {"guard": {"kind": "lm-eval", "tasks": self.tasks, "args": self.args,
                          "lm_eval": version}}

    def prepare(self, tokenizer, chat: bool, *, progress: bool = True) -> None:
        self.tokenizer = tokenizer

    def score(self, model, prompts, responses, *, progress: bool = True) -> Scores:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        if not hasattr(model, "generate") or not hasattr(model, "config"):
            raise SearchConfigError("--guard lm-eval runs on the transformers engine; use "
                                    "--engine hf")
        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
        passed = {k: v for k, v in self.args.items() if k not in OWN_KEYS}
        manager = TaskManager(include_path=self.args.get("include_path"))
        result = lm_eval.simple_evaluate(model=lm, tasks=self.tasks, task_manager=manager,
                                         log_samples=True, **passed)
        values: list[float] = []
        for task in self.tasks:
            samples = result["samples"].get(task, [])
            metric = self.args.get("metric") or _first_metric(result["results"][task])
            values += [float(sample[metric]) for sample in samples]
        if not values:
            raise SearchConfigError(f"--guard lm-eval:{','.join(self.tasks)} scored no document")
        return Scores(values)


def _first_metric(summary: dict[str, Any]) -> str:
    """``acc`` from lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}``."""
    for key in summary:
        name = key.split(",")[0]
        if name != "alias" and not name.endswith("_stderr") and "," in key:
            return name
    raise SearchConfigError(f"lm-eval reported no metric ({sorted(summary)})")
