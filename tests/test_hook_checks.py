"""When mergekit changes under the patches, a lost feature is named, and a guard that cannot run
refuses instead of passing. mergekit is changed in this process only (monkeypatch, restored after
each test) or stood in for by a throwaway object; the patches then install as at start-up."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from conftest import run_merge_in_process

from mergekit_expo.patches import (
    architecture,
    card,
    multimerge,
    planner,
    record,
    registry,
    run_merge,
    save_tensor,
    task_adapter,
    vocabulary,
)
from mergekit_expo.patches.apply import after_import


@pytest.fixture(autouse=True)
def fresh_losses(monkeypatch):
    monkeypatch.setattr(record, "LOST", {})
    monkeypatch.setattr(record, "_ANNOUNCED", set())


def expo(zoo, **extra) -> dict:
    return {"merge_method": "expo", "base_model": str(zoo.sft),
            "models": [{"model": str(zoo.dpo)}], "parameters": {"alpha": 0.3}, **extra}


def stand_in(module: str, name: str, fields: tuple[str, ...], execute) -> types.ModuleType:
    """A throwaway module holding a task class like mergekit's, with these fields and execute."""
    stand = types.ModuleType(module)
    setattr(stand, name, type(name, (), {"model_fields": dict.fromkeys(fields),
                                         "execute": execute}))
    return stand


def test_changed_signature_is_named_and_left_unwrapped(monkeypatch, caplog):
    import mergekit.card

    def generate_card(config, name=None):  # config_yaml is gone
        return "card"

    monkeypatch.setattr(mergekit.card, "generate_card", generate_card)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        card.install(mergekit.card)
    assert mergekit.card.generate_card is generate_card
    assert "mergekit.card.generate_card takes (config, name=None)" in caplog.text
    assert "the model card's section naming θ₀, θ_T, α and λ is off" in caplog.text
    assert "mergekit-expo supports mergekit >=0.1.5,<0.2" in caplog.text


def test_renamed_save_tensor_field_turns_the_overflow_guard_into_a_refusal(
    zoo, tmp_path, caplog
):
    def execute(self, writer, tensor):
        return None

    # mergekit's task with `dtype` renamed to `cast_to`
    moved = stand_in("mergekit.io.tasks", "SaveTensor", ("cast_to", "tensor_task", "tensor_name"),
                     execute)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        save_tensor.install(moved)
    SaveTensor = moved.SaveTensor
    assert "the out_dtype overflow guard is off" in caplog.text
    assert "SaveTensor has no ['dtype']" in caplog.text
    assert not getattr(SaveTensor.execute, "__mergekit_expo__", False)
    with pytest.raises(RuntimeError, match="refusing this merge: the out_dtype overflow guard"):
        run_merge_in_process(expo(zoo, out_dtype="float16"), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    run_merge_in_process(expo(zoo), tmp_path / "fine")  # without out_dtype nothing is missing
    assert (tmp_path / "fine" / "config.json").exists()


def test_save_tensor_wrapper_refuses_when_it_cannot_read_the_method(monkeypatch):
    from mergekit.io.tasks import SaveTensor

    class ExecuteMergeMethodTask:  # mergekit's task with `method_name` renamed
        merge_method = "expo"

    task = types.SimpleNamespace(dtype="float16", tensor_name="model.norm.weight",
                                 tensor_task=ExecuteMergeMethodTask())
    assert getattr(SaveTensor.execute, "__mergekit_expo__", False)
    with pytest.raises(RuntimeError, match="cannot tell which merge method made tensor model.norm"):
        SaveTensor.execute(task, writer=None, tensor=torch.full((2,), 1e6))


def test_a_hooked_module_that_moved_is_named_with_its_feature(caplog):
    assert "mergekit.scripts.extract_lora" not in sys.modules
    import mergekit.merge_methods

    table = {
        "mergekit.merge_methods": "mergekit_expo.patches.registry",
        "mergekit.scripts.extract_lora": "mergekit_expo.patches.card",  # there, not imported
        "mergekit.io.tasks_v2": "mergekit_expo.patches.save_tensor",
        "mergekit.tokenizers.embed": "mergekit_expo.patches.vocabulary",
    }
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        after_import("mergekit_expo.patches.registry", mergekit.merge_methods, table)
    assert set(record.LOST) == {*save_tensor.RECORDS, *vocabulary.RECORDS}
    assert "mergekit.scripts.extract_lora" not in sys.modules  # looked up, not imported
    assert "mergekit has no module mergekit.io.tasks_v2" in caplog.text
    assert "the out_dtype overflow guard is off" in caplog.text
    assert "mergekit has no module mergekit.tokenizers.embed" in caplog.text
    assert "vocabulary rows θ₀ lacks" in caplog.text


@pytest.mark.parametrize("tokenizer", [{"tokenizer": {"source": "union"}},
                                       {"tokenizer_source": "base"}], ids=str)
def test_lost_vocabulary_guard_refuses_tokenizer_configs(zoo, tmp_path, tokenizer):
    record.lose(vocabulary.PERMUTED_VOCABULARY, "mergekit has no module mergekit.tokenizer.embed")
    with pytest.raises(RuntimeError, match="vocabulary rows θ₀ lacks .* is off because mergekit"):
        run_merge_in_process(expo(zoo, **tokenizer), tmp_path / "out")


def test_changed_registry_is_named(caplog):
    moved = types.ModuleType("mergekit.merge_methods")
    moved.register = lambda: None  # takes no method any more
    moved.registered_methods = lambda: ()
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        registry.install(moved)
    assert "`merge_method: expo` is not registered" in caplog.text
    assert "mergekit.merge_methods.register takes (), which does not fit our call (method)" \
        in caplog.text
    assert set(record.LOST) == {registry.REGISTER}


def test_renamed_method_name_of_the_merge_task_turns_the_overflow_guard_off(monkeypatch,
                                                                            caplog):
    import mergekit.merge_methods.task_adapter as module

    class ExecuteMergeMethodTask:
        model_fields = {"merge_method": None, "gather_tensors": None}

        def execute(self, tensors, **_kwargs):
            return None

    monkeypatch.setattr(module, "ExecuteMergeMethodTask", ExecuteMergeMethodTask)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        task_adapter.install(module)
    assert "ExecuteMergeMethodTask has no ['method_name']" in caplog.text
    assert "the out_dtype overflow guard is off" in caplog.text
    # the vocabulary hand-over reads method_name too
    assert set(record.LOST) == {task_adapter.METHOD_NAME_FIELD, task_adapter.EXECUTE}
    assert not getattr(ExecuteMergeMethodTask.execute, "__mergekit_expo__", False)


def test_changed_run_merge_keeps_mergekit_and_says_outputs_are_written_in_place(
    monkeypatch, caplog
):
    import mergekit.merge

    def changed(merge_config, out_path, options):  # config_source is gone
        return None

    monkeypatch.setattr(mergekit.merge, "run_merge", changed)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        run_merge.install(mergekit.merge)
    assert mergekit.merge.run_merge is changed
    assert "expo merges write into the output folder in place" in caplog.text


def test_the_installed_mergekit_loses_nothing():
    import mergekit.merge  # noqa: F401 - every hooked module is imported with it
    import mergekit.merge_methods

    from mergekit_expo import register
    from mergekit_expo._startup import AFTER_IMPORT
    from mergekit_expo.patches import reads

    register()
    after_import(AFTER_IMPORT["mergekit.merge_methods"], mergekit.merge_methods, AFTER_IMPORT)
    assert all(record.check(read) is not None for read in reads.RECORDS)
    assert record.LOST == {}


def test_changed_multimerge_task_is_named(caplog):
    def execute(self, **kwargs):
        return None

    moved = stand_in("mergekit.scripts.multimerge", "MergeModelTask",  # `lazy` renamed
                     ("config_yaml", "out_path", "skip_done", "name"), execute)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        multimerge.install(moved)
    assert "MergeModelTask has no ['lazy']" in caplog.text
    assert "mergekit-multi skips an expo step whose folder holds a model merged from another" \
        in caplog.text


@pytest.mark.parametrize(
    ("patch", "module", "attribute", "changed", "feature", "refused"),
    [
        (architecture, "mergekit.architecture", "get_architecture_info",
         lambda config: None, "expo configs and inputs are not checked", {}),
        (planner, "mergekit.plan", "MergePlanner",
         type("MergePlanner", (), {"plan_to_disk": lambda self, path, extra: None}),
         "planned expo merges are not checked", {}),
        (task_adapter, "mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask",
         type("ExecuteMergeMethodTask", (), {"model_fields": {"method_name": None},
                                             "execute": lambda self, tensors, **_kwargs: None}),
         "vocabulary rows θ₀ lacks", {"tokenizer": {"source": "union"}}),
        (multimerge, "mergekit.scripts.multimerge", "make_tasks",
         lambda merge_configs, dependencies, merge_options: None,
         "mergekit-multi steps are checked only when each one starts", None),
    ],
    ids=["architecture", "planner", "task_adapter", "multimerge"],
)
def test_changed_check_patches_are_named_and_the_config_checks_fail_closed(
    patch, module, attribute, changed, feature, refused, zoo, tmp_path, caplog
):
    stand = types.ModuleType(module)
    setattr(stand, attribute, changed)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        patch.install(stand)
    assert feature in caplog.text
    assert getattr(stand, attribute) is changed  # left as mergekit has it
    if refused is not None:  # a guard that cannot run refuses the merges that need it
        with pytest.raises(RuntimeError, match=f"refusing this merge: .*{feature}"):
            run_merge_in_process(expo(zoo, **refused), tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
