"""One plan for every surface: the merge, ``check``, the search and the card read a config alike.

Each refusal case below used to diverge on the previous main: ``final: 'yes'`` made the merge take
the first model as θ_T while check and the search took the last; ``check`` said "nothing wrong"
and the merge then refused (a tensor missing from one input, different vocabularies, ``lambda``
with one aligned model), or ``check`` ended in a traceback (two ``final: true`` models, corrupt
safetensors offsets, ``dtype: bf16``). Now the merge, ``check`` and the search refuse each with
the same message, and for every config that merges, all three read the same roles, α, λ and
dtypes per tensor.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import run_merge_in_process, write_config
from reference import agreement, formula64, load
from safetensors.torch import load_file, save_file
from test_examples import EXAMPLES, checkpoints, substitute
from test_validation import build_llava

from mergekit_expo.check.findings import ExpoConfigError
from mergekit_expo.cli import main
from mergekit_expo.plan.build import build_plan, plan_config
from mergekit_expo.search.merge_config import SearchConfigError, load_search_config


def expo_config(base, *models, final=None, **parameters) -> dict:
    config = {"merge_method": "expo", "base_model": str(base),
              "models": [{"model": str(m)} for m in models]}
    if final is not None:
        config["models"][0]["parameters"] = {"final": final}
    if parameters:
        config["parameters"] = parameters
    return config


def without_tensor(source: Path, out: Path, name: str) -> Path:
    if not out.exists():
        shutil.copytree(source, out)
        tensors = load_file(str(out / "model.safetensors"))
        del tensors[name]
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def with_corrupt_offsets(source: Path, out: Path) -> Path:
    """Same bytes, but one tensor's data_offsets are not numbers."""
    if not out.exists():
        shutil.copytree(source, out)
        path = out / "model.safetensors"
        data = path.read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        name = next(n for n in header if n != "__metadata__")
        header[name]["data_offsets"] = ["zero", "ten"]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (length - len(text))
        assert len(text) == length, "the corrupt header must keep its length"
        path.write_bytes(data[:8] + text + data[8 + length :])
    return out


def cases(zoo, tmp_path_factory) -> dict[str, tuple[dict, str]]:
    """name -> (config, a part of the message every surface must give)."""
    root = tmp_path_factory.mktemp("plan_inputs")
    sft, dpo = zoo.sft, zoo.dpo
    other = zoo.relative("dpo_b", sft, seed=2)
    lacking = without_tensor(dpo, root / "lacking", "model.layers.0.mlp.up_proj.weight")
    grown = zoo.relative("dpo_grown", sft, seed=3, add_tokens=["<extra>"])
    corrupt = with_corrupt_offsets(dpo, root / "corrupt")
    return {
        "final_yes": (expo_config(sft, dpo, other, final="yes"), "`final: 'yes'` in models[0]"),
        "final_one": (expo_config(sft, dpo, other, final=1), "`final: 1` in models[0]"),
        "two_finals": (
            {**expo_config(sft, dpo, other),
             "models": [{"model": str(dpo), "parameters": {"final": True}},
                        {"model": str(other), "parameters": {"final": True}}]},
            "more than one model has `final: true`",
        ),
        "dtype_bf16": ({**expo_config(sft, dpo), "dtype": "bf16"},
                       "`dtype: bf16` is not a dtype mergekit reads; did you mean "
                       "`dtype: bfloat16`?"),
        "out_dtype_fp32": ({**expo_config(sft, dpo), "out_dtype": "fp32"},
                           "did you mean `out_dtype: float32`?"),
        "lambda_alone": (expo_config(sft, dpo, alpha=0.3, **{"lambda": 0.3}),
                         "no intermediate checkpoint is listed"),
        "missing_tensor": (expo_config(sft, lacking),
                           f"missing from {lacking} (e.g. model.layers.0.mlp.up_proj.weight)"),
        "vocabularies": (expo_config(sft, grown),
                         "different shapes in different inputs: model.embed_tokens.weight"),
        "corrupt_offsets": (expo_config(sft, corrupt),
                            f"{corrupt / 'model.safetensors'} has a corrupt safetensors header"),
        "typo": (expo_config(sft, dpo, alhpa=0.5), "did you mean `alpha`?"),
        "unmatched_filter": (expo_config(sft, dpo, alpha=[{"filter": "mpl", "value": 0.5},
                                                          {"value": 0.3}]),
                             "the filter `mpl` of `alpha` in parameters matches no tensor"),
    }


CASES = ["final_yes", "final_one", "two_finals", "dtype_bf16", "out_dtype_fp32", "lambda_alone",
         "missing_tensor", "vocabularies", "corrupt_offsets", "typo", "unmatched_filter"]


@pytest.fixture(scope="module")
def refusals(zoo, tmp_path_factory):
    return cases(zoo, tmp_path_factory)


@pytest.mark.parametrize("name", CASES)
def test_merge_check_and_search_refuse_alike(refusals, name, tmp_path):
    config, expected = refusals[name]
    path = write_config(tmp_path / f"{name}.yml", config)

    with pytest.raises(ExpoConfigError) as raised:  # the merge, at its start
        run_merge_in_process(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_message = str(raised.value)
    assert expected in merge_message

    checked = CliRunner().invoke(main, ["check", str(path), str(tmp_path / "out")])
    assert checked.exit_code == 1, checked.output
    assert "Traceback" not in checked.output
    for line in merge_message.splitlines():  # every refusal of the merge, word for word
        assert f"ERROR: {line}" in checked.output, (line, checked.output)

    with pytest.raises(SearchConfigError) as searched:
        load_search_config(path)
    assert expected in str(searched.value)


def test_final_true_on_the_first_model_is_theta_t_everywhere(zoo, tmp_path):
    """With a boolean ``final`` the merge, the plan, check, the card and the search agree."""
    other = zoo.relative("dpo_b", zoo.sft, seed=2)
    config = expo_config(zoo.sft, zoo.dpo, other, final=True, alpha=0.5)
    path = write_config(tmp_path / "final.yml", config)
    plan = build_plan(path)
    assert {str(t.final) for t in plan.tensors} == {str(zoo.dpo)}
    assert plan.slices[0].final == plan.tensors[0].final
    assert load_search_config(path).final == plan.slices[0].final
    checked = CliRunner().invoke(main, ["check", str(path)])
    assert f"θ_T = {zoo.dpo}; intermediates = ['{other}']" in checked.output
    out = run_merge_in_process(config, tmp_path / "out")
    assert f"final θ_T: {zoo.dpo}" in (out / "README.md").read_text()
    merged, base, final = load(out), load(zoo.sft), load(zoo.dpo)
    name = "model.layers.0.mlp.up_proj.weight"
    expected = formula64(base[name], final[name], [], alpha=0.5, lam=0.0)
    assert agreement(merged[name], expected) > 0.999


def _agreement_configs(zoo, tmp_path_factory) -> list[tuple[str, dict]]:
    paths = checkpoints(zoo)
    found = []
    steps = tmp_path_factory.mktemp("steps")
    for example in EXAMPLES:
        documents = substitute(list(yaml.safe_load_all(example.read_text())), paths)
        produced: dict[str, str] = {}
        for index, document in enumerate(documents):
            for entry in document.get("models", []):  # an earlier step's output
                entry["model"] = produced.get(entry["model"], entry["model"])
            document["base_model"] = produced.get(document.get("base_model"),
                                                  document.get("base_model"))
            if document.get("base_model") is None:
                document.pop("base_model")
            name = document.pop("name", None)
            if document["merge_method"] == "expo":
                found.append((f"{example.stem}-{index}", document))
            if name is not None and index < len(documents) - 1:
                produced[name] = str(run_merge_in_process(document, steps / example.stem / name))
    it1, it2, it3 = zoo.iterates(3)
    found += [
        ("expo", expo_config(zoo.sft, zoo.dpo, alpha=0.4)),
        ("iterative", expo_config(zoo.sft, it1, it2, it3, alpha=0.4, **{"lambda": 0.3})),
        ("filters", expo_config(zoo.sft, zoo.dpo, alpha=[{"filter": "mlp", "value": 0.5},
                                                         {"value": 0.2}])),
        ("gradient", expo_config(zoo.sft, zoo.dpo, alpha=[0.1, 0.5])),
        ("dtypes", {**expo_config(zoo.sft, zoo.dpo, alpha=0.3), "dtype": "float32",
                    "out_dtype": "bfloat16"}),
    ]
    return found


def test_merge_check_and_search_read_every_config_alike(zoo, tmp_path_factory, tmp_path):
    """For every config of examples/ and the main forms of the tests: the merge writes, per
    tensor, the formula with the plan's roles, α and λ, in the plan's dtype; check prints the
    plan's roles; the search takes the same roles and working dtypes."""
    for label, config in _agreement_configs(zoo, tmp_path_factory):
        path = write_config(tmp_path / f"{label}.yml", config)
        plan = build_plan(path)
        assert plan.tensors, label

        checked = CliRunner().invoke(main, ["check", str(path), "--allow-warnings"])
        assert checked.exit_code == 0, (label, checked.output)
        for piece in plan.slices:
            assert f"θ₀ = {piece.reference}; θ_T = {piece.final};" in checked.output, label

        search = load_search_config(path)
        assert (search.reference, search.final, tuple(search.intermediates)) == (
            plan.slices[0].reference, plan.slices[0].final, plan.slices[0].intermediates)
        assert search.working_dtypes() == {t.inputs[t.final]: t.working_dtype
                                           for t in plan.tensors}

        out = run_merge_in_process(config, tmp_path / f"out_{label}")
        merged = load(out)
        inputs = {m: load(str(m)) for m in plan.models}
        for tensor in plan.tensors:
            written = merged[tensor.name]
            assert str(written.dtype).removeprefix("torch.") == tensor.output_dtype, label
            assert tensor.input_dtypes == {  # as each input stores it
                m: str(inputs[m][n].dtype).removeprefix("torch.") for m, n in tensor.inputs.items()
            }, label
            if tensor.working_dtype is None:
                continue
            cast = getattr(torch, tensor.working_dtype)
            expected = formula64(
                inputs[tensor.reference][tensor.inputs[tensor.reference]].to(cast),
                inputs[tensor.final][tensor.inputs[tensor.final]].to(cast),
                [inputs[m][tensor.inputs[m]].to(cast) for m in tensor.intermediates],
                alpha=tensor.alpha, lam=tensor.lam,
            ).to(cast).double()
            assert agreement(written, expected) > 0.999, (label, tensor.name)
        card = (out / "README.md").read_text()
        assert f"final θ_T: {plan.slices[0].final}" in card, label


def test_a_config_level_plan_needs_no_model_files(tmp_path):
    plan = plan_config({"merge_method": "expo", "base_model": "org/sft",
                        "models": [{"model": "org/dpo"}], "parameters": {"alpha": 0.4}})
    assert (str(plan.slices[0].reference), str(plan.slices[0].final)) == ("org/sft", "org/dpo")
    assert plan.slices[0].alpha == 0.4 and plan.tensors == ()


def test_planning_leaves_mergekit_s_loader_cache_as_it_was(zoo, tmp_path):
    """check and the search plan with mergekit's process-wide LoaderCache: settings and
    loaders are restored after the plan, so a caller's own merge sees them unchanged."""
    from mergekit.io.tasks import LoaderCache
    from mergekit.options import MergeOptions

    cache = LoaderCache()
    cache.setup(MergeOptions(lora_merge_cache=str(tmp_path / "mine")))
    before = (dict(cache.loaders), cache.lora_cache_dir, cache.lazy_unpickle)
    plan = build_plan(expo_config(zoo.sft, zoo.dpo, alpha=0.3))
    assert plan.tensors
    assert (dict(cache.loaders), cache.lora_cache_dir, cache.lazy_unpickle) == before
    with pytest.raises(TypeError):  # the plan is read only
        plan.tensors[0].inputs[plan.slices[0].final] = "x"


def test_transformers_renames_are_asked_for_only_where_the_plan_does_not_read_a_name(
    zoo, tmp_path_factory, monkeypatch
):
    """A checkpoint whose every tensor the plan reads under its own name keeps its names, which
    are what transformers' renames give them too; a LLaVA checkpoint, whose ``vision_tower.*``
    mergekit plans under other names, gets transformers' renames."""
    from mergekit_expo.patches import reads

    asked, real = [], reads.checkpoint_renames
    monkeypatch.setattr(reads, "checkpoint_renames",
                        lambda model_type, names: asked.append(model_type) or real(model_type,
                                                                                   names))
    plan = build_plan(expo_config(zoo.sft, zoo.dpo, alpha=0.3))
    assert asked == [] and plan.planned_names
    for model, names in plan.planned_names.items():
        assert dict(names) == real(model.config().model_type, names)

    root = tmp_path_factory.mktemp("llava_plan")
    sft, dpo = build_llava(root / "sft", 0), build_llava(root / "dpo", 1)
    plan = build_plan(expo_config(sft, dpo, alpha=0.3, warn_relative_change=10))
    assert asked == ["llava", "llava"]
    for names in plan.planned_names.values():
        assert any(planned != name for name, planned in names.items())

def test_a_lost_feature_and_a_file_in_place_of_out_are_refused_by_check_as_by_the_merge(
    zoo, tmp_path, monkeypatch
):
    from mergekit_expo.patches import planner, record

    config = expo_config(zoo.sft, zoo.dpo, alpha=0.3)
    path = write_config(tmp_path / "c.yml", config)
    blocker = tmp_path / "out"
    blocker.write_text("a file")
    with pytest.raises(ExpoConfigError) as raised:
        run_merge_in_process(config, blocker)
    checked = CliRunner().invoke(main, ["check", str(path), str(blocker)])
    assert checked.exit_code == 1 and f"ERROR: {raised.value}" in checked.output

    monkeypatch.setitem(record.LOST, planner.PLAN_TO_DISK, "mergekit's plan_to_disk changed")
    with pytest.raises(record.LostFeatureError) as lost:
        run_merge_in_process(config, tmp_path / "merged")
    assert "planned expo merges are not checked" in str(lost.value)
    checked = CliRunner().invoke(main, ["check", str(path)])
    assert checked.exit_code == 1 and f"ERROR: {lost.value}" in checked.output
