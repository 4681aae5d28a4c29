"""An expo merge's output folder holds the complete new model or is left as it was.

The real mergekit (``run_merge`` in process, ``mergekit-yaml`` and ``mergekit-multi``), tiny
real checkpoints; failures are injected at exact moments by tests/faults.py (signals, a file-size
limit as ``ulimit -f`` sets it) or by a real ``ulimit -f`` in the shell.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_merge_in_process, write_config
from reference import agreement, formula64, load

from mergekit_expo.output.staging import IncompleteOutputError, is_model_file, verify

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def expo(zoo, alpha: float) -> dict:
    return {
        "merge_method": "expo",
        "base_model": str(zoo.sft),
        "models": [{"model": str(zoo.dpo)}],
        "parameters": {"alpha": alpha},
    }


def snapshot(folder: Path) -> dict[str, str]:
    """Every file of the folder (recursively) and a hash of its bytes, but for the hidden
    staging and set-aside folders (``leftovers`` lists those)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.relative_to(folder).parts[0].startswith(".expo-")
    }


def model_files(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(name for name in os.listdir(folder) if is_model_file(name))


def leftovers(out: Path) -> list[str]:
    """Staging or set-aside folders: inside OUT (or, as no merge should make them, beside it)."""
    inside = sorted(p.name for p in out.glob(".expo-*")) if out.is_dir() else []
    return inside + sorted(p.name for p in out.parent.glob(f".{out.name}.expo-*"))


def assert_loads_as(out: Path, zoo, alpha: float) -> None:
    """transformers reads exactly the merge's weights (not an earlier merge's) from ``out``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    state = model.state_dict()
    theta0, theta1 = load(zoo.sft), load(zoo.dpo)
    for name, tensor in theta1.items():
        assert agreement(state[name], formula64(theta0[name], tensor, alpha=alpha)) >= 0.9999, name


def expected_files(out: Path) -> set[str]:
    """A model folder: metadata, tokenizer, and exactly the weight files its index names."""
    index = out / "model.safetensors.index.json"
    weights = (
        {index.name, *json.loads(index.read_text())["weight_map"].values()}
        if index.exists() else {"model.safetensors"}
    )
    return weights | {"config.json", "generation_config.json", "README.md", "mergekit_config.yml",
                      "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def earlier(zoo, tmp_path_factory) -> Path:
    """A complete earlier merge (α = 0.5) with another shard layout: an index and 16 shards."""
    out = tmp_path_factory.mktemp("earlier") / "model"
    return run_merge_in_process(expo(zoo, 0.5), out, out_shard_size=200_000)


@pytest.mark.parametrize("first_shard_size", [200_000, None], ids=["sharded-then-single",
                                                                  "single-then-sharded"])
def test_rerun_with_another_shard_layout_leaves_exactly_the_new_model(
    zoo, tmp_path, first_shard_size
):
    out = tmp_path / "out"
    first = {"out_shard_size": first_shard_size} if first_shard_size else {}
    second = {} if first_shard_size else {"out_shard_size": 200_000}
    run_merge_in_process(expo(zoo, 0.5), out, **first)
    (out / "notes.txt").write_text("mine")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    run_merge_in_process(expo(zoo, 0.2), out, **second)
    assert set(os.listdir(out)) == expected_files(out) | {"notes.txt", ".git"}
    assert (out / "notes.txt").read_text() == "mine" and (out / ".git" / "HEAD").exists()
    assert "\n# out\n" in (out / "README.md").read_text()  # the card names OUT, not the staging
    assert leftovers(out) == []
    assert_loads_as(out, zoo, 0.2)


def test_exception_late_in_the_merge_leaves_the_earlier_model_untouched(
    zoo, tmp_path, earlier, monkeypatch
):
    import mergekit.merge

    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    before = snapshot(out)

    def broken_card(**kwargs):
        raise RuntimeError("injected: card")

    monkeypatch.setattr(mergekit.merge, "generate_card", broken_card)
    with pytest.raises(RuntimeError, match="injected: card"):
        run_merge_in_process(expo(zoo, 0.2), out)
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_failed_first_merge_creates_no_model_files(zoo, tmp_path, monkeypatch):
    """The weights are complete, then writing config.json fails."""
    import transformers

    def broken_save(self, *args, **kwargs):
        raise OSError(28, "injected: No space left on device")

    config, out = expo(zoo, 0.2), tmp_path / "out"  # the checkpoints are built before the fault
    monkeypatch.setattr(transformers.PretrainedConfig, "save_pretrained", broken_save)
    with pytest.raises(IncompleteOutputError, match="injected"):
        run_merge_in_process(config, out)
    assert not out.exists()  # the merge created it, and removed it again
    assert model_files(out) == [] and leftovers(out) == []


def test_mergekit_multi_reruns_an_interrupted_step(zoo, tmp_path, monkeypatch):
    """An interrupted step leaves no model, so ``mergekit-multi`` does not skip it as done."""
    import mergekit.merge
    from mergekit.scripts.multimerge import main as mergekit_multi

    step = {"name": "step", **expo(zoo, 0.2)}
    final = {"merge_method": "linear", "models": [{"model": "step", "parameters": {"weight": 1}}]}
    config = tmp_path / "multi.yml"
    config.write_text(json.dumps(step) + "\n---\n" + json.dumps(final) + "\n")
    args = [str(config), "-I", str(tmp_path / "steps"), "--out-path", str(tmp_path / "final")]
    original = mergekit.merge._copy_tokenizer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while mergekit copies the step's tokenizer

    monkeypatch.setattr(mergekit.merge, "_copy_tokenizer", interrupted)
    with pytest.raises(BaseException):  # noqa: B017 - click turns Ctrl-C into Abort
        mergekit_multi(args, standalone_mode=False)
    assert model_files(tmp_path / "steps" / "step") == []
    monkeypatch.setattr(mergekit.merge, "_copy_tokenizer", original)
    mergekit_multi(args, standalone_mode=False)
    done = tmp_path / "steps" / "step"
    assert set(os.listdir(done)) == expected_files(done)
    assert_loads_as(done, zoo, 0.2)


def test_model_files_are_those_the_docs_list():
    names = ["config.json", "generation_config.json", "README.md", "mergekit_config.yml",
             "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "model.safetensors", "model-00001-of-00002.safetensors",
             "pytorch_model.bin", "x.pt", "x.pth", "x.gguf", "model.safetensors.index.json"]
    assert [name for name in names if not is_model_file(name)] == []
    assert not is_model_file("notes.txt") and not is_model_file(".git")


def test_mergekit_multi_merges_again_a_step_whose_folder_holds_another_config(
    zoo, tmp_path, caplog
):
    """A lazy run skips a step whose folder holds a model, unless it came from another config."""
    from mergekit.scripts.multimerge import main as mergekit_multi

    def run(alpha, *options, steps="steps"):
        step = {"name": "step", **expo(zoo, alpha)}
        config = tmp_path / f"multi{alpha}.yml"
        config.write_text(json.dumps(step) + "\n")
        mergekit_multi([str(config), "-I", str(tmp_path / steps), *options],
                       standalone_mode=False)

    run(0.5)
    done = tmp_path / "steps" / "step"
    card = (done / "README.md").stat().st_mtime_ns
    run(0.5)  # the same config: skipped as done
    assert (done / "README.md").stat().st_mtime_ns == card
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        run(0.2)
    assert "holds a model merged from another config; merging it again" in caplog.text
    assert set(os.listdir(done)) == expected_files(done)
    assert_loads_as(done, zoo, 0.2)
    # without a model card there is nothing to compare: mergekit's rule (skip) stands
    run(0.5, "--no-write-model-card", steps="bare")
    run(0.2, "--no-write-model-card", steps="bare")
    assert_loads_as(tmp_path / "bare" / "step", zoo, 0.5)


def test_non_expo_merges_are_left_to_mergekit(zoo, tmp_path, monkeypatch):
    import mergekit_expo.output.staging as output

    def no_staging(out_path):
        raise AssertionError("a linear merge was staged")

    monkeypatch.setattr(output, "staged", no_staging)
    config = {"merge_method": "linear", "models": [
        {"model": str(zoo.sft), "parameters": {"weight": 1}}]}
    assert (run_merge_in_process(config, tmp_path / "out") / "config.json").exists()


def test_verify_refuses_truncated_weights_missing_shards_and_empty_tokenizer(zoo, tmp_path,
                                                                              earlier):
    folder = tmp_path / "model"
    shutil.copytree(zoo.sft, folder)
    verify(folder)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1)
    with pytest.raises(IncompleteOutputError, match="model.safetensors is .* bytes, its header"):
        verify(folder)
    shutil.copy(zoo.sft / "model.safetensors", weights)
    (folder / "tokenizer_config.json").write_text("")
    with pytest.raises(IncompleteOutputError, match="tokenizer_config.json is not valid JSON"):
        verify(folder)
    shutil.copy(zoo.sft / "tokenizer_config.json", folder / "tokenizer_config.json")
    (folder / "merges.txt").write_text("")
    with pytest.raises(IncompleteOutputError, match="tokenizer file merges.txt is empty"):
        verify(folder)
    shards = tmp_path / "shards"
    shutil.copytree(earlier, shards)
    (shards / "model-00003-of-00016.safetensors").unlink()
    with pytest.raises(IncompleteOutputError, match="names model-00003-of-00016.safetensors"):
        verify(shards)


# --- real processes: signals and full disks at exact moments (tests/faults.py) ---------------


def merge_args(config: Path, out: Path) -> list[str]:
    return [str(config), str(out), "--no-write-model-card"]


def start(args: list[str], **kwargs) -> subprocess.Popen:
    # no bytecode caching: a file-size limit would leave a .pyc cut short for later processes
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **kwargs)


def driver(tmp_path: Path, name: str, scenarios: list[dict]) -> subprocess.Popen:
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps(scenarios))
    return start([sys.executable, str(HERE / "faults.py"), str(spec)])


def test_interrupted_or_failed_mergekit_yaml_leaves_no_mixed_or_incomplete_model(
    zoo, tmp_path, earlier
):
    """Ctrl-C, SIGTERM, SIGKILL while config.json is written; a full disk right after the weights,
    while copying the tokenizer, and (real ``ulimit -f``) while writing the weights."""
    config = write_config(tmp_path / "expo.yml", expo(zoo, 0.2))
    outs = {name: tmp_path / name for name in
            ("sigint", "sigterm", "sigkill", "after_weights", "tokenizer", "ulimit")}
    for name in ("sigint", "sigterm", "sigkill", "tokenizer", "ulimit"):  # an earlier model
        shutil.copytree(earlier, outs[name])
    before = snapshot(earlier)

    def scenario(name, fault):
        return {"name": name, "fault": fault, "args": merge_args(config, outs[name])}

    processes = {
        "in_process": driver(tmp_path, "in_process", [
            scenario("sigint", "sigint_while_saving_config"),
            scenario("after_weights", "disk_full_after_weights"),
            scenario("tokenizer", "disk_full_while_copying_tokenizer"),
        ]),
        **{
            name: driver(tmp_path, name, [scenario(name, f"{name}_while_saving_config")])
            for name in ("sigterm", "sigkill")
        },
        "ulimit": start(["bash", "-c", 'ulimit -f 100 && exec "$@"', "ulimit",
                         str(BIN / "mergekit-yaml"), *merge_args(config, outs["ulimit"])]),
    }
    done = {name: (process.wait(timeout=600), *process.communicate()) for name, process in
            processes.items()}

    code, stdout, stderr = done["in_process"]
    assert code == 0, stderr[-3000:]
    outcomes = {row["name"]: row["outcome"] for row in map(json.loads, stdout.splitlines())}
    outcomes.update({name: f"returncode {done[name][0]}" for name in ("sigterm", "sigkill")})
    outcomes["ulimit"] = f"returncode {done['ulimit'][0]}: {done['ulimit'][2][-300:]}"
    expected = {
        "sigint": "KeyboardInterrupt",
        "sigterm": f"returncode {-signal.SIGTERM}",
        "sigkill": f"returncode {-signal.SIGKILL}",
        "after_weights": "SystemExit: 1",
        "tokenizer": "SystemExit: 1",
        "ulimit": "returncode 1",
    }
    problems = [f"{name}: {outcomes[name]!r}" for name, start in expected.items()
                if not outcomes[name].startswith(start)]
    # an earlier complete model is untouched; where there was none, no model file appeared
    problems += [f"{name}: earlier model changed" for name in ("sigint", "sigterm", "sigkill",
                                                               "tokenizer", "ulimit")
                 if snapshot(outs[name]) != before]
    problems += [f"after_weights: {model_files(outs['after_weights'])}"
                 for _ in [0] if model_files(outs["after_weights"])]
    problems += [f"{name}: {leftovers(outs[name])}" for name in outs
                 if name != "sigkill" and leftovers(outs[name])]
    assert problems == [], "\n".join(problems)
    # the refusals are one block each, naming what happened (no traceback of ours; mergekit
    # itself logs the failed tokenizer copy with its traceback)
    assert stderr.count("refused by mergekit-expo") == 2
    assert "Traceback" not in done["ulimit"][2] and "File too large" in done["ulimit"][2]
    assert "writing " in stderr and "File too large" in stderr and "is as it was" in stderr
    assert "copying the tokenizer failed" in stderr

    # SIGKILL leaves the staging folder (hidden, inside OUT); the next merge into OUT removes it
    (staging,) = leftovers(outs["sigkill"])
    assert staging.startswith(".expo-staging-")
    assert os.listdir(outs["sigkill"] / staging) == ["sigkill"]
    run_merge_in_process(expo(zoo, 0.2), outs["sigkill"])
    assert leftovers(outs["sigkill"]) == []
    assert_loads_as(outs["sigkill"], zoo, 0.2)


# --- the moment of the move --------------------------------------------------------------------


def is_commit(source, target) -> bool:
    """A rename of the move into place, not mergekit's renaming of shards in the staging folder."""
    return ".expo-staging-" not in str(source) or ".expo-staging-" not in str(target)


def record_renames(monkeypatch, fail_at: int | None = None) -> list[tuple[str, str]]:
    """Watch (and optionally break at call ``fail_at``) the renames of ``output.commit``."""
    import mergekit_expo.output.staging as output

    calls: list[tuple[str, str]] = []
    failed: list[int] = []
    real = os.rename

    def rename(source, target):
        if not is_commit(source, target):
            return real(source, target)
        if fail_at is not None and len(calls) == fail_at and not failed:
            failed.append(fail_at)  # once: the rename back must work
            raise OSError(5, "injected: Input/output error")
        calls.append((str(source), str(target)))
        real(source, target)

    monkeypatch.setattr(output.os, "rename", rename)
    return calls


def test_earlier_config_goes_aside_first_and_the_new_config_comes_in_last(
    zoo, tmp_path, earlier, monkeypatch
):
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    config = expo(zoo, 0.2)
    calls = record_renames(monkeypatch)
    run_merge_in_process(config, out)
    assert calls[0][0] == str(out / "config.json") and "/out/.expo-old-" in calls[0][1]
    assert calls[-1][1] == str(out / "config.json") and "/out/.expo-staging-" in calls[-1][0]
    went_aside = [source for source, target in calls if "/out/.expo-old-" in target]
    assert sorted(Path(p).name for p in went_aside) == sorted(os.listdir(earlier))


def test_an_error_while_moving_restores_the_earlier_model(zoo, tmp_path, earlier, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    before, config = snapshot(out), expo(zoo, 0.2)
    moves_aside = len(os.listdir(earlier))
    record_renames(monkeypatch, fail_at=moves_aside + 2)  # two new files are in already
    with pytest.raises(IncompleteOutputError, match="injected"):
        run_merge_in_process(config, out)
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_signal_while_moving_leaves_the_folder_as_it_was(zoo, tmp_path, earlier, monkeypatch):
    """Ctrl-C as the first file moves: the move runs to its end (signals held), then everything
    moves back and the interrupt is delivered: OUT holds the earlier model, as it was."""
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    before, config = snapshot(out), expo(zoo, 0.2)
    calls = record_renames(monkeypatch)
    import mergekit_expo.output.staging as output

    watched = output.os.rename

    def rename(source, target):
        if not calls and is_commit(source, target):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the first file moves
        watched(source, target)

    monkeypatch.setattr(output.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        run_merge_in_process(config, out)
    assert len(calls) > len(os.listdir(earlier))  # the signal did not stop the move half-way
    assert snapshot(out) == before
    assert leftovers(out) == []


def test_leftovers_of_a_dead_process_are_removed_by_the_next_merge(zoo, tmp_path):
    dead = _dead_pid()
    out = tmp_path / "out"
    for name in (f".expo-staging-{dead}-abc123", f".expo-old-{dead}-abc123"):
        (out / name / "out").mkdir(parents=True)
        (out / name / "out" / "config.json").write_text("{}")
    alive = out / f".expo-staging-{os.getppid()}-def456"  # a merge still running
    alive.mkdir()
    run_merge_in_process(expo(zoo, 0.2), out)
    assert leftovers(out) == [alive.name]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
