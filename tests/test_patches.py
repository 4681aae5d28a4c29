"""Each record of ``mergekit_expo.patches`` decides compatibility by binding its call to the
signature it finds. For every record, a changed copy of its mergekit (or transformers) internal
stands in: a real function with an added parameter, or one less, that does what the original does
(or records how it was called). An added optional parameter keeps every feature; a removed
parameter of the call loses exactly its record's feature, named with mergekit's version, and only
the merges that need that feature are refused."""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import types
from importlib.metadata import version

import pytest

from mergekit_expo._startup import AFTER_IMPORT
from mergekit_expo.patches import reads, record
from mergekit_expo.patches.record import MARK, LostFeatureError

# patch module -> the mergekit module it installs for
PATCHES = {importlib.import_module(patch): module for module, patch in AFTER_IMPORT.items()
           if module.startswith("mergekit.")}
WRAPS = [(patch, r) for patch in PATCHES for r in patch.RECORDS]
CALLS = [(patch, r) for patch, r in WRAPS if r.call is not None]
READS = [r for r in reads.RECORDS if r.call is not None]
INSTALLED = version("mergekit")

# which merges each record's feature is needed by (checked against the record's needed_by)
CONFIGS = {
    "plain": {},
    "out_dtype": {"out_dtype": "float16"},
    "tokenizer": {"tokenizer": {"source": "union"}},
    "tokenizer_source": {"tokenizer_source": "base"},
}
EVERY, TOKENIZER = set(CONFIGS), {"tokenizer", "tokenizer_source"}
NEEDS = {  # internal -> the configs that need its feature
    "mergekit.merge_methods.register": set(),
    "mergekit.merge_methods.registered_methods": set(),
    "mergekit.card.generate_card": set(),
    "mergekit.tokenizer.embed.PermutedVocabulary.execute": TOKENIZER,
    "mergekit.tokenizer.build.TokenizerInfo": TOKENIZER,
    "mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask.execute": TOKENIZER,
    "mergekit.io.tasks.SaveTensor.execute": {"out_dtype"},
    "mergekit.common.dtype_from_name": {"out_dtype"},
    "mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask": {"out_dtype"},
    "mergekit.merge.run_merge": set(),
    "mergekit.architecture.get_architecture_info": EVERY,
    "mergekit.plan.MergePlanner.plan_to_disk": EVERY,
    "mergekit.scripts.multimerge.make_tasks": set(),
    "mergekit.scripts.multimerge.MergeModelTask.execute": set(),
    "mergekit.scripts.multimerge.load_config": set(),
    "mergekit.scripts.multimerge.main.callback": set(),
    "mergekit.scripts.run_yaml.main.callback": set(),
    "mergekit.merge._model_out_config": set(),
    "mergekit.merge._set_chat_template": set(),
    "transformers.conversion_mapping.get_checkpoint_conversion_mapping": EVERY,
    "transformers.core_model_loading.WeightTransform.rename_source_key": EVERY,
    "transformers.core_model_loading.WeightRenaming": EVERY,
    # the fields of the planned tasks the plan reads (every expo merge is checked on the plan)
    "mergekit.merge_methods.task_adapter.ExecuteMergeMethodTask.model_fields": EVERY,
    "mergekit.io.tasks.GatherTensors.model_fields": EVERY,
    "mergekit.io.tasks.SaveTensor.model_fields": EVERY,
    "mergekit.io.tasks.LoaderCache.setup": set(),
}
NEEDED_BY = {r: NEEDS[r.where] for r in [r for _, r in WRAPS] + list(reads.RECORDS)}


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """No loss yet; and where the patches rebind wrapped functions that mergekit imported by
    name, mergekit's are restored after the test."""
    monkeypatch.setattr(record, "_ANNOUNCED", set())
    monkeypatch.setattr(record, "LOST", {})
    for module, name in [("mergekit.merge", "generate_card"),
                         ("mergekit.merge", "get_architecture_info"),
                         ("mergekit.merge", "run_merge"),
                         ("mergekit.scripts.run_yaml", "run_merge"),
                         ("mergekit.scripts.multimerge", "run_merge")]:
        holder = importlib.import_module(module)
        monkeypatch.setattr(holder, name, getattr(holder, name))


def config(name: str):
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(
        {"merge_method": "expo", "base_model": "sft", "models": [{"model": "dpo"}],
         "parameters": {"alpha": 0.3}, **CONFIGS[name]})


def refused(verify=()) -> set[str]:
    """The configs that ``refuse_lost`` refuses now."""
    found = set()
    for name in CONFIGS:
        try:
            record.refuse_lost(config(name), verify=verify)
        except LostFeatureError:
            found.add(name)
    return found


# changes of a signature
def add_optional_keyword(signature: inspect.Signature) -> inspect.Signature:
    return _insert(signature, inspect.Parameter("extra", inspect.Parameter.KEYWORD_ONLY,
                                                default=None))


def add_optional_positional(signature: inspect.Signature) -> inspect.Signature:
    return _insert(signature, inspect.Parameter(
        "extra", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))


def add_required_keyword(signature: inspect.Signature) -> inspect.Signature:
    return _insert(signature, inspect.Parameter("extra", inspect.Parameter.KEYWORD_ONLY))


def _insert(signature: inspect.Signature, added: inspect.Parameter) -> inspect.Signature:
    parameters = list(signature.parameters.values())
    at = len([p for p in parameters if p.kind <= added.kind])
    return signature.replace(parameters=parameters[:at] + [added] + parameters[at:])


def without(name: str):
    def change(signature: inspect.Signature) -> inspect.Signature:
        return signature.replace(parameters=[p for p in signature.parameters.values()
                                             if p.name != name])
    return change


def changed(original, change, calls: list | None = None):
    """A function with ``original``'s signature changed by ``change``. It binds its arguments as
    that signature does (a wrong call raises TypeError); then it records them in ``calls``, or,
    without ``calls``, does what ``original`` does with those it still has."""
    signature = change(inspect.signature(original))

    def stand_in(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if calls is not None:
            calls.append(dict(bound.arguments))
            return {}
        bound.arguments.pop("extra", None)
        return original(*bound.args, **bound.kwargs)

    stand_in.__signature__ = signature
    stand_in.__name__ = stand_in.__qualname__ = original.__name__
    return stand_in


def stand_in_module(r: record.Internal, attribute) -> types.ModuleType:
    """A copy of the module of ``r`` in which ``r``'s internal is ``attribute`` (a method's class
    is copied too: its fields, and the changed method)."""
    real = importlib.import_module(r.module)
    stand = types.ModuleType(r.module)
    stand.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
    owner, _, name = r.name.rpartition(".")
    if owner:
        model_fields = dict(getattr(getattr(real, owner), "model_fields", {}))
        attribute = type(owner, (), {"model_fields": model_fields, name: attribute})
        name = owner
    setattr(stand, name, attribute)
    return stand


def plain(signature: inspect.Signature) -> inspect.Signature:
    """The signature as the messages show it: without annotations."""
    return signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty)


def internal(r: record.Internal, module=None):
    found = module or importlib.import_module(r.module)
    for part in r.name.split("."):
        found = getattr(found, part)
    return found


def install_changed(patch, r: record.Internal, stand: types.ModuleType, monkeypatch) -> None:
    """Install ``patch`` as at start-up, with ``stand`` in place of the module of ``r``."""
    if r.module == PATCHES[patch]:
        patch.install(stand)
    else:  # another module's internal (dtype_from_name, TokenizerInfo): looked up by name
        monkeypatch.setitem(sys.modules, r.module, stand)
        patch.install(importlib.import_module(PATCHES[patch]))


class NonExpo(dict):
    """Stands for every argument of a wrapped call that takes a wrapper's non-expo path."""

    merge_method = method_name = "linear"
    dtype = base_model = None
    lazy = False

    @property
    def config(self):
        return self


def test_every_record_is_listed_with_the_merges_that_need_it():
    records = [r for _, r in WRAPS] + list(reads.RECORDS)
    assert sorted(r.where for r in records) == sorted(NEEDS)  # each internal once
    for r in records:
        assert {name for name in CONFIGS if r.needed_by(config(name))} == NEEDED_BY[r], r.where


@pytest.mark.parametrize("change", [add_optional_keyword, add_optional_positional])
@pytest.mark.parametrize(("patch", "r"), CALLS, ids=[r.where for _, r in CALLS])
def test_an_added_optional_parameter_keeps_the_feature(patch, r, change, monkeypatch):
    calls = [] if r.call.forwards else None  # a wrapper's original records how it was called
    target = changed(reads.original(internal(r)), change, calls)
    stand = stand_in_module(r, target)
    install_changed(patch, r, stand, monkeypatch)
    assert record.LOST == {}
    if not r.call.forwards:
        return  # called, not wrapped: nothing more to see
    wrapper = internal(r, stand)
    assert getattr(wrapper, MARK, False)
    # the wrapper passes mergekit's caller's new argument on, with everything else
    filled = {p.name: NonExpo() for p in inspect.signature(target).parameters.values()
              if p.default is p.empty and p.name not in r.call.positional
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    wrapper(*(NonExpo() for _ in r.call.positional), **filled, extra="new")
    (arguments,) = calls
    assert arguments["extra"] == "new"
    assert all(isinstance(arguments[name], NonExpo) for name in r.call.positional)


@pytest.mark.parametrize(
    ("patch", "r", "removed"),
    [(patch, r, name) for patch, r in CALLS for name in (*r.call.positional, *r.call.keywords)],
    ids=[f"{r.where}-{name}" for _, r in CALLS for name in (*r.call.positional, *r.call.keywords)],
)
def test_a_removed_parameter_loses_exactly_its_feature(patch, r, removed, monkeypatch, caplog):
    target = changed(reads.original(internal(r)), without(removed))
    stand = stand_in_module(r, target)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        install_changed(patch, r, stand, monkeypatch)
    assert set(record.LOST) == {r}
    assert internal(r, stand) is target  # left as mergekit has it
    assert f"{r.where} takes {plain(inspect.signature(target))}" in caplog.text
    assert r.feature in caplog.text
    assert f"mergekit {INSTALLED} is installed" in caplog.text
    assert refused() == NEEDED_BY[r]
    for name in NEEDED_BY[r]:
        with pytest.raises(LostFeatureError) as refusal:
            record.refuse_lost(config(name))
        assert r.feature in str(refusal.value)
        assert f"mergekit {INSTALLED} is installed" in str(refusal.value)


@pytest.mark.parametrize(("patch", "r"), CALLS, ids=[r.where for _, r in CALLS])
def test_a_new_required_parameter_is_for_mergekit_to_pass_through_a_wrapper(patch, r,
                                                                            monkeypatch):
    target = changed(reads.original(internal(r)), add_required_keyword)
    install_changed(patch, r, stand_in_module(r, target), monkeypatch)
    # a wrapper passes on what mergekit's caller gives; a call of ours cannot fill it
    assert set(record.LOST) == (set() if r.call.forwards else {r})


@pytest.mark.parametrize(
    ("patch", "r", "field"),
    [(patch, r, field) for patch, r in WRAPS for field in r.fields],
    ids=[f"{r.where}-{field}" for _, r in WRAPS for field in r.fields],
)
def test_a_removed_field_loses_the_features_that_read_it(patch, r, field, monkeypatch):
    owner = r.name.split(".")[0]
    model = internal(record.Internal(r.module, owner, ""))
    methods = {q.name.split(".")[1] for q in patch.RECORDS if q.name.startswith(f"{owner}.")}
    copy = type(owner, (), {"model_fields": {k: v for k, v in model.model_fields.items()
                                             if k != field},
                            **{name: getattr(model, name) for name in methods}})
    stand = types.ModuleType(r.module)
    stand.__dict__.update({k: v for k, v in vars(sys.modules[r.module]).items()
                           if not k.startswith("__")})
    setattr(stand, owner, copy)
    install_changed(patch, r, stand, monkeypatch)
    assert set(record.LOST) == {q for q in patch.RECORDS
                                if q.module == r.module and q.name.split(".")[0] == owner
                                and field in q.fields}
    assert f"{r.module}.{owner} has no {[field]!r}" in record.LOST[r]


READ_CALLS = {
    reads.OUT_CONFIG: lambda: reads.model_out_config(None, None),
    reads.CHAT_TEMPLATE: lambda: reads.set_chat_template(None, None),
    reads.CONVERSION_MAPPING: lambda: reads.checkpoint_renames("llava", ["vision_tower.x"]),
    reads.RENAME_SOURCE_KEY: lambda: reads.checkpoint_renames("llava", ["vision_tower.x"]),
    reads.WEIGHT_RENAMING: lambda: reads.checkpoint_renames("llava", ["vision_tower.x"]),
    reads.LOADER_CACHE: lambda: reads.loader_cache_for(None).__enter__(),
}


def change_internal(r: record.Internal, change, monkeypatch):
    owner, _, name = r.name.rpartition(".")
    holder = internal(record.Internal(r.module, owner, "")) if owner \
        else importlib.import_module(r.module)
    target = changed(getattr(holder, name), change)
    monkeypatch.setattr(holder, name, target)
    return target


@pytest.mark.parametrize("r", READS, ids=[r.where for r in READS])
def test_a_read_keeps_working_with_an_added_optional_parameter(r, monkeypatch):
    target = change_internal(r, add_optional_keyword, monkeypatch)
    assert record.read(r) is target
    if r in (reads.CONVERSION_MAPPING, reads.RENAME_SOURCE_KEY):
        assert READ_CALLS[r]() == {"vision_tower.x": "model.vision_tower.x"}
    assert record.LOST == {}
    assert refused(verify=reads.RECORDS) == set()


@pytest.mark.parametrize(
    ("r", "removed"), [(r, name) for r in READS for name in (*r.call.positional, *r.call.keywords)],
    ids=[f"{r.where}-{n}" for r in READS for n in (*r.call.positional, *r.call.keywords)],
)
def test_a_read_without_a_parameter_it_passes_names_its_feature(r, removed, monkeypatch):
    change_internal(r, without(removed), monkeypatch)
    with pytest.raises(LostFeatureError) as error:
        READ_CALLS[r]()
    assert r.feature in str(error.value)
    assert f"mergekit {INSTALLED} is installed" in str(error.value)
    assert set(record.LOST) == {r}
    monkeypatch.setattr(record, "LOST", {})  # not read yet: the merge checks what it needs
    assert refused(verify=reads.RECORDS) == NEEDED_BY[r]


def test_a_read_of_a_class_that_is_gone_names_its_feature(monkeypatch):
    import transformers.core_model_loading

    monkeypatch.delattr(transformers.core_model_loading, "WeightRenaming")
    with pytest.raises(LostFeatureError, match="core_model_loading has no WeightRenaming"):
        reads.checkpoint_renames("llava", ["vision_tower.x"])
    assert refused(verify=reads.RECORDS) == EVERY


def test_original_unwraps_only_our_wrappers():
    import functools

    import mergekit.architecture

    def theirs(config, options):
        return None

    decorated = functools.wraps(theirs)(lambda *args: theirs(*args))  # mergekit's own decorator
    assert reads.original(decorated) is decorated
    wrapped = mergekit.architecture.get_architecture_info
    assert getattr(wrapped, MARK, False)
    assert reads.original(wrapped) is wrapped.__wrapped__


def test_a_patch_that_fails_to_install_loses_its_features_and_mergekit_still_imports(
    monkeypatch, caplog
):
    from mergekit_expo.patches import planner
    from mergekit_expo.patches.apply import after_import

    def broken(module):
        raise KeyError("boom")

    monkeypatch.setattr(planner, "install", broken)
    with caplog.at_level(logging.WARNING, logger="mergekit_expo"):
        after_import("mergekit_expo.patches.planner", types.ModuleType("mergekit.plan"), {})
    assert set(record.LOST) == {planner.PLAN_TO_DISK}
    assert "extending mergekit.plan failed (KeyError: 'boom')" in caplog.text
    assert refused() == EVERY
