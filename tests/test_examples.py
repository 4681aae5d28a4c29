"""Every config in examples/configs/ runs on tiny local checkpoints with the paths substituted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_merge_in_process
from reference import agreement, formula64, load

EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yml"))

# Every model an example names stands for one tiny local checkpoint of the same role.
PLACEHOLDERS = {
    "HuggingFaceH4/mistral-7b-sft-alpha": "sft",
    "allenai/tulu-2-70b": "sft",
    "/models/llama3-8b-sft": "sft",
    "HuggingFaceH4/zephyr-7b-alpha": "dpo",
    "allenai/tulu-2-dpo-70b": "dpo",
    "/models/llama3-8b-dpo-iter1": "iter1",
    "/models/llama3-8b-dpo-iter2": "iter2",
    "/models/llama3-8b-dpo-iter3": "iter3",
    "/models/mistral-7b-domain-finetune": "domain",
}


def checkpoints(zoo) -> dict[str, Path]:
    it1, it2, it3 = zoo.iterates(3)
    domain = zoo.relative("domain", zoo.sft, seed=99)
    return {
        "sft": zoo.sft,
        "dpo": zoo.dpo,
        "iter1": it1,
        "iter2": it2,
        "iter3": it3,
        "domain": domain,
    }


def substitute(documents: list[dict], paths: dict[str, Path]) -> list[dict]:
    step_names = {doc["name"] for doc in documents if "name" in doc}

    def swap(reference: str) -> str:
        if reference in step_names:
            return reference
        assert reference in PLACEHOLDERS, f"add {reference!r} to PLACEHOLDERS"
        return str(paths[PLACEHOLDERS[reference]])

    for doc in documents:
        if "base_model" in doc:
            doc["base_model"] = swap(doc["base_model"])
        for entry in doc.get("models", []):
            entry["model"] = swap(entry["model"])
    return documents


def alpha_for(setting, tensor_name: str, layers: int = 2) -> float:
    """Independent reading of a filter/gradient setting for our 2-layer checkpoints."""
    if not isinstance(setting, list) or not setting or not isinstance(setting[0], dict):
        setting = [{"value": setting}]
    for rule in setting:
        if rule.get("filter") in (None, "*") or rule["filter"] in tensor_name:
            value = rule["value"]
            if not isinstance(value, list):
                return float(value)
            t = 0.0
            for layer in range(layers):
                if f".layers.{layer}." in tensor_name:
                    t = layer / (layers - 1)
            return float(value[0] + t * (value[-1] - value[0]))  # two-point gradients only
    raise AssertionError(f"no rule for {tensor_name}")


def check_expo_output(out_dir: Path, doc: dict) -> None:
    out = load(out_dir)
    theta0 = load(doc["base_model"])
    listed = [load(entry["model"]) for entry in doc["models"]]
    params = doc.get("parameters", {})
    lam = float(params.get("lambda", 0.0))
    for name, tensor in out.items():
        alpha = alpha_for(params.get("alpha", 0.3), name)
        expected = formula64(
            theta0[name], listed[-1][name], [m[name] for m in listed[:-1]], alpha=alpha, lam=lam
        )
        assert agreement(tensor, expected) >= 0.9999, name


def test_every_example_is_covered():
    names = {path.name for path in EXAMPLES}
    assert names == {
        "zephyr-7b-alpha-expo.yml",
        "tulu-2-dpo-70b-expo.yml",
        "iterative-dpo-llama3-8b.yml",
        "iterative-dpo-two-step.multi.yml",
        "expo-then-slerp.multi.yml",
        "per-module-alpha.yml",
    }
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["merge_method"] in {"expo", "linear", "slerp"}


@pytest.mark.parametrize(
    "path", [p for p in EXAMPLES if ".multi." not in p.name], ids=lambda p: p.name
)
def test_single_step_example(zoo, tmp_path, path):
    (doc,) = substitute([yaml.safe_load(path.read_text())], checkpoints(zoo))
    check_expo_output(run_merge_in_process(doc, tmp_path / "out"), doc)


def run_multi(config: Path, steps: Path, out: Path) -> None:
    """mergekit-multi's click command as a user runs it (here in this process; its console
    script runs as a process in test_nothing_lost.py and the benchmark's two-step row)."""
    from click.testing import CliRunner
    from mergekit.scripts.multimerge import main as multimerge

    result = CliRunner().invoke(multimerge, [str(config), "-I", str(steps), "--out-path", str(out)])
    assert result.exit_code == 0, result.output[-3000:]


def run_multi_example(name: str, zoo, tmp_path: Path) -> tuple[list[dict], dict[str, Path]]:
    """Substitute the example's paths and run it; return its documents and the checkpoints."""
    path = next(p for p in EXAMPLES if p.name == name)
    paths = checkpoints(zoo)
    docs = substitute(list(yaml.safe_load_all(path.read_text())), paths)
    config = tmp_path / path.name
    config.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    run_multi(config, tmp_path / "steps", tmp_path / "out")
    return docs, paths


def test_two_step_iterative_recipe_matches_one_pass(zoo, tmp_path):
    _, paths = run_multi_example("iterative-dpo-two-step.multi.yml", zoo, tmp_path)
    out = load(tmp_path / "out")
    theta0, it1, it2, it3 = (load(paths[k]) for k in ("sft", "iter1", "iter2", "iter3"))
    for name, tensor in out.items():
        assert tensor.dtype == torch.bfloat16
        expected = formula64(theta0[name], it3[name], [it1[name], it2[name]], alpha=0.4, lam=0.3)
        assert agreement(tensor, expected) >= 0.9999, name


def test_expo_then_slerp_recipe(zoo, tmp_path):
    from mergekit.merge_methods import merge_tensors

    docs, paths = run_multi_example("expo-then-slerp.multi.yml", zoo, tmp_path)
    step = tmp_path / "steps" / "zephyr-expo"
    check_expo_output(step, {**docs[0], "base_model": str(paths["sft"])})
    extrapolated, domain, out = load(step), load(paths["domain"]), load(tmp_path / "out")
    for name, tensor in out.items():
        expected = merge_tensors(
            [extrapolated[name], domain[name]], "slerp", base_index=0, parameters={"t": 0.3}
        )
        assert torch.equal(tensor, expected), name
