"""``mergekit-expo check``: the preflight, through click's runner (issue 9, item 3)."""

from __future__ import annotations

import json
import os
import shutil
from collections import namedtuple

import pytest
import torch
from click.testing import CliRunner
from conftest import run_merge_in_process, write_config
from test_validation import build_llava, expo_config

from mergekit_expo.cli import main


def check(config: dict, tmp_path, *args: str):
    path = write_config(tmp_path / "expo.yml", config)
    return CliRunner().invoke(main, ["check", str(path), *args])


def test_a_sound_config_passes_and_shows_roles_relatedness_and_size(zoo, tmp_path):
    config = expo_config(zoo.sft, zoo.dpo)
    config["parameters"] = {"alpha": [{"filter": "mlp", "value": 0.5}, {"value": 0.3}]}
    result = check(config, tmp_path, str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert f"θ₀ = {zoo.sft}; θ_T = {zoo.dpo}; intermediates = none" in result.output
    assert '"filter": "mlp"' in result.output
    line = next(x for x in result.output.splitlines() if "relatedness" in x)
    assert 0.005 < float(line.rsplit(" ", 1)[1]) < 0.05  # dpo moved each weight by 2 % of RMS
    assert "estimated output size" in result.output and "free disk space at" in result.output
    assert result.output.rstrip().endswith("nothing wrong")
    assert not (tmp_path / "out").exists()


def test_typo_and_top_level_typo_fail_with_did_you_mean(zoo, tmp_path):
    config = expo_config(zoo.sft, zoo.dpo, lamda=0.3)
    config["paramters"] = {"alpha": 0.5}
    result = check(config, tmp_path)
    assert result.exit_code == 1
    assert "unknown parameter `lamda` in parameters; did you mean `lambda`?" in result.output
    assert "unknown top-level key `paramters`" in result.output
    assert "did you mean `parameters`?" in result.output


def test_missing_path_and_truncated_file_are_named(zoo, tmp_path):
    result = check(expo_config(zoo.sft, "/no/such/dpo"), tmp_path)
    assert result.exit_code == 1
    assert "model path /no/such/dpo does not exist (models[0])" in result.output

    damaged = tmp_path / "dpo_cut"
    shutil.copytree(zoo.dpo, damaged)
    os.truncate(damaged / "model.safetensors", 4)
    result = check(expo_config(zoo.sft, damaged), tmp_path)
    assert result.exit_code == 1
    assert f"{damaged / 'model.safetensors'} is truncated" in result.output


def test_llava_dropped_language_model_fails(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("llava_check")
    sft, dpo = build_llava(root / "sft", 0), build_llava(root / "dpo", 1)
    result = check(expo_config(sft, dpo), tmp_path)
    assert result.exit_code == 1
    assert "21 tensors that every input holds would not be written" in result.output
    assert "under language_model)" in result.output
    assert "differs from θ₀" in result.output  # independent random models: unrelated


def test_mixed_dtypes_warn_and_exit_1_unless_warnings_are_allowed(zoo, tmp_path):
    dpo32 = zoo.relative("dpo_f32", zoo.sft, seed=1, dtype=torch.float32)
    result = check(expo_config(zoo.sft, dpo32), tmp_path)
    assert result.exit_code == 1
    assert "the inputs have different dtypes" in result.output
    assert "common dtype float32 and writes float32" in result.output
    assert "0 error(s), 1 warning(s)" in result.output
    allowed = CliRunner().invoke(main, ["check", str(tmp_path / "expo.yml"), "--allow-warnings"])
    assert allowed.exit_code == 0 and "nothing wrong (1 warning(s))" in allowed.output


def test_tied_and_untied_inputs_fail(zoo, tmp_path):
    tied = zoo.base("sft_tied", hidden=256, tie_word_embeddings=True)
    result = check(expo_config(tied, zoo.dpo), tmp_path)
    assert result.exit_code == 1
    assert "the inputs disagree on tied embeddings" in result.output


def test_cuda_without_cuda_fails(zoo, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    result = check(expo_config(zoo.sft, zoo.dpo), tmp_path, "--cuda")
    assert result.exit_code == 1
    assert "--cuda / --device cuda was given, but CUDA is not available" in result.output


def test_not_enough_disk_space_fails(zoo, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    result = check(expo_config(zoo.sft, zoo.dpo), tmp_path, str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "not enough free disk space for the output" in result.output


def test_chat_template_of_the_aligned_model_and_the_line_that_keeps_it(zoo, tmp_path):
    """mergekit copies θ₀'s tokenizer files; the suggested line makes it carry θ_T's template."""
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    chat = tmp_path / "dpo_chat"
    shutil.copytree(zoo.dpo, chat)
    settings = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": template}))
    config = expo_config(zoo.sft, chat, alpha=0.3)
    result = check(config, tmp_path)
    assert result.exit_code == 1
    line = f'tokenizer: {{source: "{chat}"}}'
    assert f"add this line to the config: {line}" in result.output

    assert "generation_config" not in result.output

    config["tokenizer"] = {"source": str(chat)}
    result = check(config, tmp_path)
    assert "chat template" not in result.output
    out = run_merge_in_process(config, tmp_path / "merged")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).chat_template.strip() == template.strip()


def test_generation_config_that_differs_says_what_to_copy(zoo, tmp_path):
    tuned = tmp_path / "dpo_generation"
    shutil.copytree(zoo.dpo, tuned)
    settings = json.loads((tuned / "generation_config.json").read_text())
    (tuned / "generation_config.json").write_text(json.dumps({**settings, "temperature": 0.6}))
    result = check(expo_config(zoo.sft, tuned), tmp_path)
    assert result.exit_code == 1
    assert f"after merging, cp {tuned}/generation_config.json OUT/" in result.output
