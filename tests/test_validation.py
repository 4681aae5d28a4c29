"""Config mistakes and damaged inputs are refused before any tensor is read (issue 9, items 1, 8).

Each case used to merge with the default α = 0.3 (or drop tensors) and exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import namedtuple

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import mergekit_yaml_in_process, run_merge_in_process, write_config
from reference import load
from test_merge_graph import expo_config

from mergekit_expo.check.findings import ExpoConfigError
from mergekit_expo.cli import main


def refused(config: dict, out, match: str, **options) -> str:
    """Run the real merge; it must raise before creating the output folder. ``mergekit-expo
    check`` of the same config must refuse it too, with every line of the merge's message."""
    with pytest.raises(ExpoConfigError, match=match) as raised:
        run_merge_in_process(config, out, **options)
    assert not out.exists(), "something was written"
    path = write_config(out.parent / f"{out.name}.check.yml", config)
    flags = ["--cuda"] if options.get("cuda") else []
    checked = CliRunner().invoke(main, ["check", str(path), str(out), *flags])
    assert checked.exit_code == 1, checked.output
    for line in str(raised.value).splitlines():
        assert f"ERROR: {line}" in checked.output, (line, checked.output)
    assert not out.exists(), "check wrote something"
    return str(raised.value)


@pytest.mark.parametrize(
    ("key", "suggestion"), [("alhpa", "alpha"), ("Alpha", "alpha"), ("lamda", "lambda")]
)
def test_misspelt_global_parameter_is_refused_with_did_you_mean(zoo, tmp_path, key, suggestion):
    config = expo_config(zoo.sft, zoo.dpo)
    config["parameters"] = {key: 0.5}
    message = refused(config, tmp_path / "out", f"unknown parameter `{key}` in parameters")
    assert f"did you mean `{suggestion}`?" in message


def test_misspelt_slice_parameter_names_its_place(zoo, tmp_path):
    sources = [{"model": str(m), "layer_range": [0, 2]} for m in (zoo.sft, zoo.dpo)]
    config = {
        "merge_method": "expo",
        "base_model": str(zoo.sft),
        "slices": [{"sources": sources, "parameters": {"aplha": 0.5}}],
    }
    message = refused(config, tmp_path / "out", r"`aplha` in slices\[0\].parameters")
    assert "did you mean `alpha`?" in message


def test_alpha_under_a_model_is_refused_with_how_to_write_it(zoo, tmp_path):
    config = expo_config(zoo.sft, zoo.dpo)
    config["models"][0]["parameters"] = {"alpha": 0.5}
    message = refused(config, tmp_path / "out", r"`alpha` in models\[0\].parameters")
    assert "top-level `parameters:`" in message
    assert "alpha: [{filter: mlp, value: 0.5}, {value: 0.3}]" in message


def test_lambda_under_the_base_model_is_refused(zoo, tmp_path):
    it1, it2 = zoo.iterates(2)
    config = expo_config(zoo.sft, zoo.sft, it1, it2, alpha=0.3)
    config["models"][0]["parameters"] = {"lambda": 0.3}
    message = refused(config, tmp_path / "out", r"`lambda` in models\[0\].parameters")
    assert f"under the base model {zoo.sft}" in message


def test_alpha_under_a_slice_source_is_refused(zoo, tmp_path):
    sources = [{"model": str(m), "layer_range": [0, 2]} for m in (zoo.sft, zoo.dpo)]
    sources[1]["parameters"] = {"alpha": 0.5}
    config = {"merge_method": "expo", "base_model": str(zoo.sft), "slices": [{"sources": sources}]}
    refused(config, tmp_path / "out", r"`alpha` in slices\[0\].sources\[1\].parameters")


def test_final_is_only_a_per_model_parameter(zoo, tmp_path):
    config = expo_config(zoo.sft, zoo.dpo, alpha=0.3, final=True)
    refused(config, tmp_path / "out", "would mark every model as θ_T")
    config = expo_config(zoo.sft, zoo.sft, zoo.dpo, alpha=0.3)
    config["models"][0]["parameters"] = {"final": True}
    refused(config, tmp_path / "out", "set on the base model")


def test_filter_that_matches_no_tensor_is_refused(zoo, tmp_path):
    config = expo_config(zoo.sft, zoo.dpo)
    config["parameters"] = {"alpha": [{"filter": "mlpp", "value": 0.5}, {"value": 0.3}]}
    message = refused(config, tmp_path / "out", "the filter `mlpp` of `alpha` in parameters")
    assert "Did you mean `mlp`?" in message


def test_filters_that_match_merge_and_negative_alpha_is_logged(zoo, tmp_path, caplog):
    config = expo_config(zoo.sft, zoo.dpo)
    config["parameters"] = {"alpha": [{"filter": "mlp", "value": -0.25}, {"value": 0.3}]}
    with caplog.at_level(logging.INFO, logger="mergekit_expo"):
        out = run_merge_in_process(config, tmp_path / "out")
    notes = [r.getMessage() for r in caplog.records if "negative" in r.getMessage()]
    assert len(notes) == 1 and "alpha = -0.25" in notes[0] and "back toward θ₀" in notes[0]
    merged, theta0, theta1 = load(out), load(zoo.sft), load(zoo.dpo)
    name = "model.layers.0.mlp.up_proj.weight"
    between = (merged[name].double() - theta0[name].double()) * (
        merged[name].double() - theta1[name].double()
    )
    assert float((between <= 0).double().mean()) > 0.99  # lies between θ₀ and θ₁


def test_missing_model_path_is_named_with_its_place(zoo, tmp_path):
    config = expo_config(zoo.sft, "/nonexistent/models/dpo")
    message = refused(config, tmp_path / "out", "model path /nonexistent/models/dpo does not exist")
    assert r"(models[0])" in message and "Repo id" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(zoo, tmp_path):
    refused(
        expo_config(zoo.sft, zoo.dpo, alpha=0.3), tmp_path / "out",
        r"--cuda / --device cuda was given, but CUDA is not available", cuda=True,
    )


def test_truncated_input_is_named(zoo, tmp_path):
    damaged = tmp_path / "dpo_truncated"
    shutil.copytree(zoo.dpo, damaged)
    weights = damaged / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    refused(
        expo_config(zoo.sft, damaged, alpha=0.3), tmp_path / "out",
        f"{weights} is truncated",
    )


# -- LLaVA-style checkpoints: mergekit's guessed architecture drops the language model ----------


def build_llava(path, seed):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=16, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=299)
    LlavaForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llava_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return build_llava(root / "sft", 0), build_llava(root / "dpo", 1)


def test_llava_whose_language_model_mergekit_would_drop_is_refused(llava_pair, tmp_path):
    sft, dpo = llava_pair
    message = refused(
        expo_config(sft, dpo, alpha=0.3, warn_relative_change=10), tmp_path / "out",
        "tensors that every input holds would not be written",
    )
    assert "language_model.model.layers.0" in message


# -- mergekit-multi: every expo step is checked before the first one runs ---------------------


def test_multimerge_checks_every_step_before_running_any(zoo, tmp_path):
    from mergekit.scripts.multimerge import main as multimerge

    first = expo_config(zoo.sft, zoo.dpo, alpha=0.3)
    second = expo_config(zoo.sft, "step_one", lamda=0.3)
    source = tmp_path / "multi.yml"
    source.write_text(yaml.safe_dump_all([{"name": "step_one", **first}, second]))
    result = CliRunner().invoke(
        multimerge,
        [str(source), "-I", str(tmp_path / "steps"), "--out-path", str(tmp_path / "final")],
    )
    assert result.exit_code == 1  # one block, no traceback
    assert "mergekit-multi: refused by mergekit-expo" in result.output
    assert "mergekit-multi step (final, unnamed)" in result.output
    assert "did you mean `lambda`?" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "steps" / "step_one").exists()  # step one did not run either


# -- mergekit-yaml's own command -----------------------------------------------------------------


def test_mergekit_yaml_refuses_a_typo_and_writes_nothing(zoo, tmp_path):
    """mergekit's click command, wrapped as in the console script (whose process is run in
    test_cli.py and test_nothing_lost.py)."""
    config = write_config(tmp_path / "typo.yml", expo_config(zoo.sft, zoo.dpo, alhpa=0.5))
    out = tmp_path / "out"
    done = mergekit_yaml_in_process(config, out)
    assert done.exit_code != 0
    assert "unknown parameter `alhpa` in parameters; did you mean `alpha`?" in done.stderr
    assert not out.exists()


def test_mergekit_yaml_refuses_bad_alpha_and_writes_nothing_complete(zoo, tmp_path):
    config = write_config(tmp_path / "bad.yml", expo_config(zoo.sft, zoo.dpo, alpha="lots"))
    done = mergekit_yaml_in_process(config, tmp_path / "out")
    assert done.exit_code == 1 and "Traceback" not in done.output  # one block
    assert "mergekit-yaml: refused by mergekit-expo" in done.stderr
    assert ("expo parameter 'alpha' must be a number, got the string 'lots'; write e.g. "
            "`alpha: 0.3` (all layers)") in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("alpha, says", [
    ([0.1, "x"], "expo parameter 'alpha' must be a number, got the string 'x'"),
    ([{"filter": "mlp", "value": True}, {"value": 0.3}], "got True (bool)"),
    (float("inf"), "expo parameter 'alpha' must be finite, got inf"),
])
def test_every_value_of_a_setting_is_checked_with_the_plan(zoo, tmp_path, alpha, says):
    with pytest.raises(ExpoConfigError, match=re.escape(says)):
        run_merge_in_process(expo_config(zoo.sft, zoo.dpo, alpha=alpha), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tied_and_untied_inputs_are_refused_at_merge_start(zoo, tmp_path):
    tied = zoo.base("sft_tied", hidden=256, tie_word_embeddings=True)
    refused(expo_config(tied, zoo.dpo, alpha=0.3), tmp_path / "out",
            "the inputs disagree on tied embeddings")


def test_mixed_dtypes_without_dtype_are_a_logged_warning(zoo, tmp_path, caplog):
    dpo32 = zoo.relative("dpo_f32", zoo.sft, seed=1, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        out = run_merge_in_process(expo_config(zoo.sft, dpo32, alpha=0.3), tmp_path / "out")
    assert any("common dtype float32 and writes float32" in r.getMessage() for r in caplog.records)
    assert {t.dtype for t in load(out).values()} == {torch.float32}


def test_damaged_headers_and_incomplete_index_are_named(zoo, tmp_path):
    from mergekit_expo.plan.headers import CheckpointError, read_checkpoint

    corrupt = tmp_path / "corrupt"
    shutil.copytree(zoo.dpo, corrupt)
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[8:12] = b"\xff\xfe{{"
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="has a corrupt safetensors header"):
        read_checkpoint(corrupt)

    longer = tmp_path / "longer"
    shutil.copytree(zoo.dpo, longer)
    with open(longer / "model.safetensors", "ab") as handle:
        handle.write(b"\0" * 10)
    with pytest.raises(CheckpointError, match="is corrupt: 10 bytes follow the tensors"):
        read_checkpoint(longer)

    sharded = tmp_path / "sharded"
    shutil.copytree(zoo.dpo, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    names = list(load(zoo.dpo))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is listed in"):
        read_checkpoint(sharded)
    weight_map[names[0]] = "model-00001-of-00002.safetensors"
    weight_map["model.extra.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="names 1 tensors that its shards do not hold"):
        read_checkpoint(sharded)


def test_not_enough_disk_space_is_refused_before_writing(zoo, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    refused(expo_config(zoo.sft, zoo.dpo, alpha=0.3), tmp_path / "out",
            "not enough free disk space for the output")


def test_chat_template_that_differs_from_the_aligned_models_is_a_logged_warning(
    zoo, tmp_path, caplog
):
    chat = tmp_path / "dpo_chat"
    shutil.copytree(zoo.dpo, chat)
    settings = json.loads((chat / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (chat / "tokenizer_config.json").write_text(json.dumps(settings))
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        run_merge_in_process(expo_config(zoo.sft, chat, alpha=0.3), tmp_path / "out")
    expected = f'add this line to the config: tokenizer: {{source: "{chat}"}}'
    assert any(expected in r.getMessage() for r in caplog.records)
