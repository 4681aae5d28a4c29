"""Issue 17 on the merge's surfaces: inputs are never written, one kind of artefact per folder,
staging on the output's own file system (a real mount), mergekit-multi re-merges what reads a
re-merged step, top-level keys checked at the merge's start, refusals as one block.

The real mergekit (in process where the engine is under test, ``mergekit-yaml``,
``mergekit-multi`` and ``mergekit-expo check`` as processes where the command line is), tiny real
checkpoints from ``conftest.zoo``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import mergekit_yaml_in_process, run_merge_in_process, write_config
from reference import agreement, formula64, load
from test_output_integrity import assert_loads_as, expected_files, snapshot

from mergekit_expo.check.findings import ExpoConfigError

BIN = Path(sys.executable).parent


def expo(zoo, alpha: float, **extra) -> dict:
    return {"merge_method": "expo", "base_model": str(zoo.sft),
            "models": [{"model": str(zoo.dpo)}], "parameters": {"alpha": alpha}, **extra}


def run(*command: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture
def inputs_copy(zoo, tmp_path) -> tuple[Path, Path]:
    """θ₀ and θ_T copied where the test may point an output at them."""
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    shutil.copytree(zoo.sft, sft)
    shutil.copytree(zoo.dpo, dpo)
    return sft, dpo


def config_for(sft: Path, dpo: Path, alpha=0.3) -> dict:
    return {"merge_method": "expo", "base_model": str(sft), "models": [{"model": str(dpo)}],
            "parameters": {"alpha": alpha}}


# --- 1. inputs are never written ------------------------------------------------------------


def test_mergekit_yaml_into_the_aligned_models_folder_is_refused_in_one_block(
    inputs_copy, tmp_path
):
    sft, dpo = inputs_copy
    config = write_config(tmp_path / "expo.yml", config_for(sft, dpo))
    before = snapshot(dpo)
    done = run("mergekit-yaml", str(config), str(dpo))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "refused by mergekit-expo" in done.stderr
    assert f"output folder {dpo} is the folder of models[0]" in done.stderr
    assert "inputs are never written" in done.stderr and "(run with -v" in done.stderr
    assert snapshot(dpo) == before and not list(dpo.glob(".expo-*"))
    # check and -v through the same click commands, in this process
    from click.testing import CliRunner

    from mergekit_expo.cli import main
    from mergekit_expo.errors import ExpoError

    checked = CliRunner().invoke(main, ["check", str(config), str(dpo)])
    assert checked.exit_code == 1
    assert f"ERROR: output folder {dpo} is the folder of models[0]" in checked.stderr
    verbose = mergekit_yaml_in_process(config, dpo, "-v")
    assert verbose.exit_code == 1  # -v: the refusal raised as it is, for its traceback
    assert isinstance(verbose.exception, ExpoError) and str(dpo) in str(verbose.exception)
    assert snapshot(dpo) == before


@pytest.mark.parametrize("where", ["base_model", "inside", "contains", "symlink", "hardlink"])
def test_an_output_over_an_input_is_refused_before_anything_is_read(inputs_copy, tmp_path,
                                                                     where):
    sft, dpo = inputs_copy
    out = {"base_model": sft, "inside": dpo / "expo", "contains": tmp_path,
           "symlink": tmp_path / "link", "hardlink": tmp_path / "out"}[where]
    if where == "symlink":
        out.symlink_to(dpo, target_is_directory=True)
    if where == "hardlink":
        out.mkdir()
        os.link(dpo / "model.safetensors", out / "model.safetensors")
    before = {p: snapshot(p) for p in (sft, dpo)}
    with pytest.raises(ExpoConfigError) as refused:
        run_merge_in_process(config_for(sft, dpo), out)
    message = str(refused.value)
    assert "inputs are never written" in message or "a link to a file of" in message
    assert {"base_model": "base_model", "inside": "models[0]", "contains": "base_model",
            "symlink": "models[0]", "hardlink": "models[0]"}[where] in message
    assert {p: snapshot(p) for p in (sft, dpo)} == before


def test_write_best_into_an_input_is_refused_before_the_first_candidate(inputs_copy, tmp_path):
    from mergekit_expo.search.merge_config import SearchConfigError, load_search_config
    from mergekit_expo.search.run import refuse_write_best_target

    sft, dpo = inputs_copy
    config = write_config(tmp_path / "expo.yml", config_for(sft, dpo))
    with pytest.raises(SearchConfigError, match=r"--write-best .*is the folder of models\[0\]"):
        refuse_write_best_target(load_search_config(config), dpo)


def test_a_search_out_dir_inside_an_input_is_refused_before_anything_is_read(inputs_copy,
                                                                              tmp_path):
    from mergekit_expo.search.merge_config import SearchConfigError, load_search_config
    from mergekit_expo.search.run import refuse_out_dir_in_an_input

    sft, dpo = inputs_copy
    config = write_config(tmp_path / "expo.yml", config_for(sft, dpo))
    search = load_search_config(config)
    for out_dir in (dpo, dpo / "search"):
        with pytest.raises(SearchConfigError, match=r"OUT_DIR: output folder .* the folder of"):
            refuse_out_dir_in_an_input(search, out_dir)
    refuse_out_dir_in_an_input(search, tmp_path / "search")  # beside the inputs: fine
    refuse_out_dir_in_an_input(search, tmp_path)  # holding them: the search adds its own files


# --- 2. one kind of artefact per folder ------------------------------------------------------


def test_a_model_over_an_adapter_or_beside_files_loaders_read_is_refused(zoo, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ExpoConfigError, match=r"holds an adapter \(adapter_config.json"):
        run_merge_in_process(expo(zoo, 0.3), adapter)
    code = tmp_path / "code"
    code.mkdir()
    (code / "modeling_custom.py").write_text("# remote code\n")
    with pytest.raises(ExpoConfigError, match="holds modeling_custom.py, which loaders read"):
        run_merge_in_process(expo(zoo, 0.3), code)
    assert os.listdir(code) == ["modeling_custom.py"]
    # files no loader reads stay beside the new model
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine\n")
    (notes / ".git").mkdir()
    run_merge_in_process(expo(zoo, 0.3), notes)
    assert set(os.listdir(notes)) == expected_files(notes) | {"notes.txt", ".git"}


# --- 4. staging on the output's own file system ----------------------------------------------


def _mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


@pytest.fixture
def mounted(tmp_path):
    """PARENT (a tmpfs, made read-only after OUT is mounted in it) and OUT (a writable tmpfs)."""
    parent, out = tmp_path / "parent", tmp_path / "parent" / "out"
    _mount_tmpfs(parent)
    _mount_tmpfs(out)
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(parent)], check=True)
        yield parent, out
    finally:
        subprocess.run(["umount", str(out)], check=False)
        subprocess.run(["umount", str(parent)], check=False)


def test_a_merge_into_a_mount_point_under_a_read_only_parent_works(zoo, mounted):
    parent, out = mounted
    assert os.stat(parent).st_dev != os.stat(out).st_dev  # another file system
    run_merge_in_process(expo(zoo, 0.3), out)
    assert set(os.listdir(out)) == expected_files(out)
    assert_loads_as(out, zoo, 0.3)
    run_merge_in_process(expo(zoo, 0.2), out)  # again, over the first
    assert set(os.listdir(out)) == expected_files(out)
    assert_loads_as(out, zoo, 0.2)


def test_a_read_only_output_fails_before_anything_is_computed(zoo, mounted, monkeypatch):
    import mergekit.merge

    parent, _ = mounted
    computed = []
    monkeypatch.setattr(mergekit.merge, "_copy_tokenizer", lambda *a, **k: computed.append(1))
    from mergekit_expo.output.folder import OutputFolderError

    with pytest.raises(OutputFolderError, match="cannot write into .*Read-only file system"):
        run_merge_in_process(expo(zoo, 0.3), parent / "new")
    assert computed == [] and not (parent / "new").exists()


def test_sigterm_while_the_files_move_leaves_the_folder_as_it_was(zoo, tmp_path):
    """A real SIGTERM, in a real mergekit-yaml process, as the first file moves into place."""
    earlier = tmp_path / "out"
    run_merge_in_process(expo(zoo, 0.5), earlier)
    before = snapshot(earlier)
    config = write_config(tmp_path / "expo.yml", expo(zoo, 0.2))
    spec = tmp_path / "faults.json"
    spec.write_text(json.dumps([{"name": "sigterm", "fault": "sigterm_while_moving",
                                 "args": [str(config), str(earlier), "--quiet"]}]))
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "faults.py"), str(spec)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert snapshot(earlier) == before
    assert [p.name for p in earlier.glob(".expo-*")] == []


# --- 5. mergekit-multi -------------------------------------------------------------------------


def test_mergekit_multi_merges_again_every_step_that_reads_a_re_merged_step(zoo, tmp_path):
    from mergekit.scripts.multimerge import main as mergekit_multi

    final_out = tmp_path / "final"

    def multi(alpha: float) -> None:
        step = {"name": "step", **expo(zoo, alpha)}
        final = {"merge_method": "expo", "base_model": str(zoo.sft),
                 "models": [{"model": "step"}], "parameters": {"alpha": 0.5}}
        config = tmp_path / f"multi-{alpha}.yml"
        config.write_text(json.dumps(step) + "\n---\n" + json.dumps(final) + "\n")
        mergekit_multi([str(config), "-I", str(tmp_path / "steps"), "--out-path",
                        str(final_out), "--quiet"], standalone_mode=False)

    multi(0.5)
    multi(0.2)  # the step is stale: merged again, and so is the final merge that reads it
    theta0, theta1 = load(zoo.sft), load(zoo.dpo)
    step = load(tmp_path / "steps" / "step")
    final = load(final_out)
    for name, tensor in theta1.items():
        assert agreement(step[name], formula64(theta0[name], tensor, alpha=0.2)) >= 0.9999
        expected = formula64(theta0[name], step[name].to(torch.float64), alpha=0.5)
        assert agreement(final[name], expected) >= 0.9999, name


# --- 6. top-level keys at the merge's start --------------------------------------------------


@pytest.mark.parametrize("typo", ["paramters", "dtpye", "out_dtyp"])
def test_top_level_typos_are_refused_by_mergekit_yaml(zoo, tmp_path, typo):
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    raw = expo(zoo, 0.3)
    raw[typo] = raw.pop("parameters") if typo == "paramters" else "bfloat16"
    config = write_config(tmp_path / "typo.yml", raw)
    with pytest.raises(ExpoConfigError, match=f"unknown top-level key `{typo}`.*did you mean"):
        mergekit_yaml([str(config), str(tmp_path / "out"), "-v"], standalone_mode=False)
    assert not (tmp_path / "out").exists()


def test_mergekit_multi_refuses_top_level_typos_of_expo_steps_in_one_block(zoo, tmp_path):
    step = {"name": "step", **expo(zoo, 0.3)}
    step["parameter"] = step.pop("parameters")
    other = {"name": "other", "merge_method": "linear", "extra_key": 1,
             "models": [{"model": str(zoo.dpo), "parameters": {"weight": 1.0}}]}
    config = tmp_path / "multi.yml"
    config.write_text(json.dumps(step) + "\n---\n" + json.dumps(other) + "\n")
    done = run("mergekit-multi", str(config), "-I", str(tmp_path / "steps"))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "mergekit-multi: refused by mergekit-expo" in done.stderr
    assert "unknown top-level key `parameter` in mergekit-multi step step" in done.stderr
    assert "extra_key" not in done.stderr  # other methods: as mergekit has them
    assert not (tmp_path / "steps" / "step").exists()
