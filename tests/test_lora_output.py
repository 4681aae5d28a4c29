"""`mergekit-expo lora` writes nothing it must not: inputs are never written, a folder holding a
model is refused, OUT gets the whole new adapter or keeps the earlier one (a failure while
writing, a full disk), ``--base`` must be the adapter's base model, and adapter configs are read
as PEFT reads them. Real PEFT adapters and loading, real ``mergekit-expo`` processes."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_lora import make_adapter
from test_output_integrity import leftovers, record_renames, snapshot

from mergekit_expo.cli import main
from mergekit_expo.lora.adapter import AdapterError, read_adapter
from mergekit_expo.lora.extrapolate import expo_adapter
from mergekit_expo.output.folder import OutputFolderError
from mergekit_expo.output.staging import IncompleteOutputError

peft = pytest.importorskip("peft")

BIN = Path(sys.executable).parent
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md",
                 "mergekit_expo.json"}


@pytest.fixture(scope="module")
def base(zoo) -> Path:
    return zoo.base("lora_sft", hidden=64, seed=7)


@pytest.fixture(scope="module")
def made(base, tmp_path_factory) -> Path:
    """The module's adapters (built once) and an earlier output of α = 0.3."""
    root = tmp_path_factory.mktemp("lora_output")
    make_adapter(base, root / "dpo", seed=51)
    make_adapter(base, root / "saving", seed=52, modules_to_save=["lm_head"])
    expo_adapter([root / "dpo"], root / "earlier", alpha=0.3)
    return root


@pytest.fixture
def dpo(made, tmp_path) -> Path:
    """A copy of the adapter per test: a test that writes an input must not spoil the next."""
    return Path(shutil.copytree(made / "dpo", tmp_path / "inputs" / "dpo"))


@pytest.fixture
def earlier(made, tmp_path) -> Path:
    return Path(shutil.copytree(made / "earlier", tmp_path / "out"))


def lora_cli(*args, file_size_limit: int | None = None) -> subprocess.Popen:
    """``mergekit-expo lora ARGS`` as its own process; with a file size limit as ``ulimit -f``
    sets it, and SIGXFSZ ignored, so that a write past it fails with EFBIG (and without
    bytecode caching: a .pyc cut short by the limit would break every later process)."""
    NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"} if file_size_limit is not None else {}

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.Popen(
        [str(BIN / "mergekit-expo"), "lora", *map(str, args)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **NO_PYC},
        preexec_fn=limit if file_size_limit is not None else None,
    )


def finished(process: subprocess.Popen) -> tuple[int, str]:
    """Exit status and stderr; a refusal is one ``Error:`` block without a traceback."""
    _, stderr = process.communicate(timeout=300)
    assert "Traceback" not in stderr, stderr
    return process.returncode, stderr


def scalings(base: Path, adapter: Path) -> dict[str, float]:
    """Each LoRA layer's scaling as PEFT loads ``adapter`` over ``base``."""
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                           str(adapter))
    return {name: module.scaling["default"] for name, module in model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)}


def assert_scaled(base: Path, adapter: Path, out: Path, factor: float) -> None:
    """PEFT loads ``out`` as ``adapter`` with every scaling × ``factor``."""
    given, written = scalings(base, adapter), scalings(base, out)
    assert written.keys() == given.keys() and len(given) >= 6
    for name, scaling in given.items():
        assert written[name] == pytest.approx(factor * scaling, rel=1e-12), name


# -- inputs are never written ---------------------------------------------------------------


def test_an_output_that_would_write_an_input_is_refused_before_anything_is_read(
    base, dpo, tmp_path
):
    """OUT is, lies inside or contains an input's folder (an adapter, the reference adapter,
    --base), reached through a symbolic link, or holds a hard link to an input file."""
    theta0 = Path(shutil.copytree(base, tmp_path / "inputs" / "base"))
    sft = Path(shutil.copytree(dpo, tmp_path / "inputs" / "sft"))
    (tmp_path / "link").symlink_to(dpo)
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        os.link(dpo / name, linked / name)
    cases = {  # out, options, what the message says
        "is": (dpo, {}, f"is the folder of the adapter ({dpo})"),
        "inside": (dpo / "expo", {}, f"lies inside the folder of the adapter ({dpo})"),
        "contains": (tmp_path / "inputs", {}, f"contains the adapter ({dpo})"),
        "base": (theta0 / "adapter", {"base": theta0},
                 f"lies inside the folder of --base ({theta0})"),
        "reference": (sft, {"reference_adapter": sft},
                      f"is the folder of --reference-adapter ({sft})"),
        "symlink": (tmp_path / "link", {}, f"is the folder of the adapter ({dpo})"),
        "hard link": (linked, {}, ", which is a link to a file of the adapter: writing there "
                                  "would replace an input"),
    }
    before = {path: snapshot(path) for path in (dpo, theta0, sft)}
    for case, (out, options, says) in cases.items():
        existed = out.exists()
        with pytest.raises(OutputFolderError) as refused:
            expo_adapter([dpo], out, alpha=0.3, **options)
        assert f"output folder {out} " in str(refused.value), case
        assert says in str(refused.value), case
        assert out.exists() == existed, case
    assert {path: snapshot(path) for path in before} == before
    assert sorted(os.listdir(linked)) == ["adapter_config.json", "adapter_model.safetensors"]
    (sft / "adapter_config.json").write_text("{not json")  # never read: OUT is refused first
    with pytest.raises(OutputFolderError, match="inputs are never written"):
        expo_adapter([sft], sft / "expo", alpha=0.3)

    code, stderr = finished(lora_cli(dpo, dpo / "expo", "--alpha", "0.3"))
    assert code == 1
    assert stderr == (f"Error: output folder {dpo / 'expo'} lies inside the folder of the "
                      f"adapter ({dpo}): inputs are never written; choose another output "
                      "folder\n")
    assert not (dpo / "expo").exists() and snapshot(dpo) == before[dpo]


# -- one kind of artefact per folder --------------------------------------------------------


def test_an_adapter_over_a_model_is_refused_naming_its_files(base, dpo, earlier, tmp_path):
    model = Path(shutil.copytree(base, tmp_path / "model"))
    before = snapshot(model)
    code, stderr = finished(lora_cli(dpo, model, "--alpha", "0.3"))
    assert code == 1
    assert stderr.startswith(f"Error: output folder {model} holds a model (config.json, ")
    assert "model.safetensors" in stderr and "choose an empty or new folder" in stderr
    assert snapshot(model) == before and leftovers(model) == []

    (earlier / "tokenizer.json").write_text("{}")  # beside an adapter, PEFT would load it too
    with pytest.raises(OutputFolderError, match="holds tokenizer.json, which loaders read and "
                       "the new adapter would not replace"):
        expo_adapter([dpo], earlier, alpha=0.7)


def test_a_rerun_replaces_exactly_the_adapter_files(base, dpo, earlier, monkeypatch):
    """The earlier adapter's files (an old adapter_model.bin too) go, its config first; the new
    config comes in last; files no loader reads stay; PEFT loads the new adapter."""
    torch.save({}, earlier / "adapter_model.bin")
    (earlier / "notes.txt").write_text("mine")
    (earlier / ".git").mkdir()
    calls = record_renames(monkeypatch)
    expo_adapter([dpo], earlier, alpha=0.7)
    config = str(earlier / "adapter_config.json")
    assert calls[0][0] == config and f"{earlier}/.expo-old-" in calls[0][1]
    assert calls[-1][1] == config and f"{earlier}/.expo-staging-" in calls[-1][0]
    assert set(os.listdir(earlier)) == ADAPTER_FILES | {"notes.txt", ".git"}
    assert (earlier / "notes.txt").read_text() == "mine"
    assert json.loads((earlier / "mergekit_expo.json").read_text())["alpha"] == 0.7
    assert_scaled(base, dpo, earlier, 1.7)


# -- OUT holds the whole new adapter or the earlier one --------------------------------------


def test_a_failure_while_writing_the_config_leaves_the_earlier_adapter(
    base, dpo, earlier, monkeypatch
):
    """Written in place, the new weights would load under the earlier config as a third
    adapter; staged, OUT is as it was and PEFT loads the earlier adapter."""
    before = snapshot(earlier)
    write_text = pathlib.Path.write_text

    def full_disk_at_the_config(self, *args, **kwargs):
        if self.name == "adapter_config.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk_at_the_config)
    with pytest.raises(IncompleteOutputError, match=rf"writing {earlier} failed: No space left "
                       rf"on device \(.*adapter_config.json\); {earlier} is as it was"):
        expo_adapter([dpo], earlier, alpha=0.7)
    monkeypatch.undo()
    assert snapshot(earlier) == before and leftovers(earlier) == []
    assert_scaled(base, dpo, earlier, 1.3)


def test_a_full_disk_leaves_the_earlier_adapter_and_says_so_in_one_line(dpo, earlier, tmp_path):
    """``ulimit -f`` in the child: the weights cannot be written. A first write creates no OUT;
    a folder that cannot be made is named, also in one line."""
    before = snapshot(earlier)
    (tmp_path / "a-file").write_text("")
    processes = {
        "earlier": lora_cli(dpo, earlier, "--alpha", "0.7", file_size_limit=4096),
        "new": lora_cli(dpo, tmp_path / "new", "--alpha", "0.7", file_size_limit=4096),
        "not a folder": lora_cli(dpo, tmp_path / "a-file" / "out", "--alpha", "0.7"),
    }
    done = {name: finished(process) for name, process in processes.items()}
    code, stderr = done["earlier"]
    assert code == 1
    assert stderr == (f"Error: writing {earlier} failed: File too large; {earlier} is as it "
                      "was: free space (or raise the file size limit) and run again\n")
    assert snapshot(earlier) == before and leftovers(earlier) == []
    code, stderr = done["new"]
    assert code == 1 and "File too large" in stderr and not (tmp_path / "new").exists()
    code, stderr = done["not a folder"]
    assert (code, stderr) == (1, f"Error: cannot write into {tmp_path / 'a-file' / 'out'}: Not a "
                                 "directory; choose a folder you can write to\n")


# -- --base is the adapter's base model ------------------------------------------------------


def test_a_base_of_another_name_is_refused_unless_told(base, made, tmp_path):
    renamed = Path(shutil.copytree(base, tmp_path / "renamed"))
    saving = made / "saving"
    done = CliRunner().invoke(main, ["lora", str(saving), str(tmp_path / "out"), "--alpha",
                                     "0.3", "--base", str(renamed)])  # in this process
    assert done.exit_code == 1 and isinstance(done.exception, SystemExit), done.output  # no trace
    assert done.stderr == (
        f"Error: --base {renamed} is not the model adapter {saving} was trained over: its "
        f"adapter_config.json names base_model_name_or_path {str(base)!r}. Give that model as "
        "--base, or add --ignore-base-name if this folder is that model under another name "
        "(its shapes and saved tensors are checked all the same)\n"
    )
    assert not (tmp_path / "out").exists()
    told = expo_adapter([saving], tmp_path / "told", alpha=0.3, base=renamed,
                        ignore_base_name=True)
    same = expo_adapter([saving], tmp_path / "same", alpha=0.3, base=base)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (told / name).read_bytes() == (same / name).read_bytes()


@pytest.mark.parametrize("recorded, accepted", [
    ("org/lora_sft", True),  # the repository of a Hugging Face cache snapshot
    ("ORG/LORA_SFT", True),  # compared without case
    ("/elsewhere/Other-Name", True),  # the last component of config.json's _name_or_path
    ("/elsewhere/0123abc", True),  # the last component of the folder's path
    (None, True),  # nothing recorded, nothing to compare
    ("org/another-model", False),
])
def test_the_recorded_base_is_compared_by_name(base, dpo, tmp_path, recorded, accepted):
    snapshot_dir = tmp_path / "hub" / "models--org--lora_sft" / "snapshots" / "0123abc"
    theta0 = Path(shutil.copytree(base, snapshot_dir))
    config = json.loads((theta0 / "config.json").read_text())
    (theta0 / "config.json").write_text(json.dumps({**config, "_name_or_path": "Other-Name"}))
    edit_config(dpo, base_model_name_or_path=recorded)
    if accepted:
        expo_adapter([dpo], tmp_path / "out", alpha=0.3, base=theta0)
        assert (tmp_path / "out" / "adapter_config.json").exists()
    else:
        with pytest.raises(AdapterError, match=f"names base_model_name_or_path '{recorded}'"):
            expo_adapter([dpo], tmp_path / "out", alpha=0.3, base=theta0)


def test_a_base_of_other_shapes_is_refused(zoo, dpo, tmp_path):
    narrow = zoo.base("lora_narrow", hidden=32, seed=7)
    with pytest.raises(AdapterError) as refused:
        expo_adapter([dpo], tmp_path / "out", alpha=0.3, base=narrow, ignore_base_name=True)
    lines = str(refused.value).splitlines()
    assert lines[0] == (f"--base {narrow}: model.layers.0.mlp.down_proj.weight is (32, 64), "
                        f"adapter {dpo} (A (4, 128), B (64, 4)) needs (64, 128)")
    assert lines[-2:] == ["… and 3 more", "the adapter was not trained over --base: give the "
                          "model it was trained over"]
    assert not (tmp_path / "out").exists()


def test_a_base_lacking_a_weight_or_with_a_saved_tensor_of_another_shape_is_refused(
    base, made, tmp_path
):
    from safetensors.torch import load_file, save_file

    theta0 = Path(shutil.copytree(base, tmp_path / "theta0"))
    tensors = load_file(theta0 / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    vocab, hidden = tensors["lm_head.weight"].shape
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1].clone()
    save_file(tensors, theta0 / "model.safetensors", metadata={"format": "pt"})
    saving = made / "saving"
    with pytest.raises(AdapterError) as refused:
        expo_adapter([saving], tmp_path / "out", alpha=0.3, base=theta0, ignore_base_name=True)
    assert str(refused.value).splitlines() == [
        f"--base {theta0} has no tensor model.layers.0.self_attn.q_proj.weight, which adapter "
        f"{saving} (A (4, 64), B (64, 4)) changes",
        f"--base {theta0}: lm_head.weight is ({vocab - 1}, {hidden}), adapter {saving} (a saved "
        f"tensor) needs ({vocab}, {hidden})",
        "the adapter was not trained over --base: give the model it was trained over",
    ]


def test_saved_modules_far_from_the_base_are_refused(zoo, made, tmp_path):
    """A model of the same shapes but unrelated: the saved lm_head differs from its by ~√2."""
    other = zoo.base("lora_other", hidden=64, seed=99)
    saving = made / "saving"
    with pytest.raises(AdapterError) as refused:
        expo_adapter([saving], tmp_path / "out", alpha=0.3, base=other, ignore_base_name=True)
    message = str(refused.value)
    assert message.startswith(f"adapter {saving} saves lm_head.weight, which differs from "
                              f"--base's ({other}) by 1.4")
    assert "of its norm (limit 0.25;" in message and "--max-relative-change" in message
    assert not (tmp_path / "out").exists()
    expo_adapter([saving], tmp_path / "out", alpha=0.3, base=other, ignore_base_name=True,
                 max_relative_change=2.0)
    assert "lm_head.weight" in read_adapter(tmp_path / "out").saved


# -- adapter configs as PEFT reads them ------------------------------------------------------


def edit_config(adapter: Path, **changes) -> Path:
    """``changes``: a value, or ... to leave the field out."""
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    for name, value in changes.items():
        if value is ...:
            del config[name]
        else:
            config[name] = value
    path.write_text(json.dumps(config))
    return path


def test_fields_left_out_take_peft_defaults(base, dpo, tmp_path):
    """No lora_alpha: PEFT's default 8, so the output's is 8 × (1 + α) and PEFT loads it so."""
    edit_config(dpo, lora_alpha=...)
    expo_adapter([dpo], tmp_path / "out", alpha=0.3)
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["lora_alpha"] == pytest.approx(8 * 1.3)
    assert_scaled(base, dpo, tmp_path / "out", 1.3)
    edit_config(dpo, r=...)  # PEFT's default rank 8 is not the tensors' 4
    with pytest.raises(AdapterError, match=r"has rank 4, but adapter_config.json \(r, "
                       r"rank_pattern\) gives 8"):
        expo_adapter([dpo], tmp_path / "again", alpha=0.3)


@pytest.mark.parametrize("changes, says", [
    ({"lora_alpha": "8"}, "lora_alpha must be a number, got '8'"),
    ({"r": "4"}, "r must be a positive integer, got '4'"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern['q_proj'] must be a positive integer, "
                                        "got 2.5"),
    ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern['q_proj'] must be a number, got None"),
    ({"use_rslora": "true"}, "use_rslora must be true or false, got 'true'"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of module names, got "
                                     "'lm_head'"),
])
def test_fields_of_the_wrong_type_are_named(dpo, tmp_path, changes, says):
    path = edit_config(dpo, **changes)
    with pytest.raises(AdapterError) as refused:
        expo_adapter([dpo], tmp_path / "out", alpha=0.3)
    assert str(refused.value) == f"{path}: {says}"
    path.write_text("{not json")
    with pytest.raises(AdapterError, match=re.escape(f"{path} is not valid JSON: ")):
        expo_adapter([dpo], tmp_path / "out", alpha=0.3)
    assert not (tmp_path / "out").exists()
