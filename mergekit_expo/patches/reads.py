"""Private functions of mergekit and transformers that mergekit-expo calls (not wraps).

Each read goes through its record (``record.read``): when the installed mergekit or
transformers no longer fits it, the read raises an error naming the feature and the version.

- ``mergekit.merge._model_out_config``: the output's config, needed to plan a merge as
  ``run_merge`` plans it;
- ``mergekit.merge._set_chat_template``: the chat template a merge would write (the search
  generates with it);
- the fields of mergekit's planned tasks (``ExecuteMergeMethodTask``, ``GatherTensors``,
  ``SaveTensor``): what mergekit resolved for each tensor, read by the plan;
- ``mergekit.io.tasks.LoaderCache``: set up for a plan made outside a merge, then put back;
- ``transformers.conversion_mapping.get_checkpoint_conversion_mapping`` (and the
  ``core_model_loading`` transforms it returns): how transformers renames older checkpoint
  layouts (mergekit reads LLaVA's ``vision_tower.*`` as ``model.vision_tower.*``).

``original`` unwraps only our own wrappers, so it reads nothing of mergekit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from mergekit_expo.patches.record import MARK, Call, Internal, every_expo_merge, find, read

OUT_CONFIG = Internal(
    "mergekit.merge", "_model_out_config",
    "expo cannot plan a merge outside mergekit's run (`mergekit-expo check`, the α/λ search)",
    call=Call(("config", "arch_info"), ("trust_remote_code",)),
)
CHAT_TEMPLATE = Internal(
    "mergekit.merge", "_set_chat_template",
    "the search cannot generate with the chat template the merge would write",
    call=Call(("tokenizer", "merge_config")),
)
RENAMES = (
    "expo's checks cannot match checkpoint tensor names to the names mergekit plans with "
    "(transformers' renames of older layouts)"
)
CONVERSION_MAPPING = Internal(
    "transformers.conversion_mapping", "get_checkpoint_conversion_mapping", RENAMES,
    call=Call(("model_type",)), needed_by=every_expo_merge,
)
RENAME_SOURCE_KEY = Internal(
    "transformers.core_model_loading", "WeightTransform.rename_source_key", RENAMES,
    call=Call(("self", "source_key")), needed_by=every_expo_merge,
)
WEIGHT_RENAMING = Internal(
    "transformers.core_model_loading", "WeightRenaming", RENAMES, needed_by=every_expo_merge,
)
PLANNED = (
    "expo cannot read what mergekit planned for each tensor (its roles, α, λ and inputs: the "
    "plan every expo merge is checked against)"
)
MERGE_TASK = Internal(
    "mergekit.merge_methods.task_adapter", "ExecuteMergeMethodTask.model_fields", PLANNED,
    fields=("base_model", "model_order", "parameters", "input_parameters", "gather_tensors",
            "output_weight"),
    needed_by=every_expo_merge,
)
GATHER_TASK = Internal("mergekit.io.tasks", "GatherTensors.model_fields", PLANNED,
                       fields=("weight_info",), needed_by=every_expo_merge)
SAVE_TASK = Internal("mergekit.io.tasks", "SaveTensor.model_fields", PLANNED,
                     fields=("tensor_name", "tensor_task"), needed_by=every_expo_merge)
LOADER_CACHE = Internal(
    "mergekit.io.tasks", "LoaderCache.setup",
    "expo cannot plan a merge outside mergekit's run and leave mergekit's loader cache as it was "
    "(`mergekit-expo check`, the α/λ search)",
    call=Call(("self",), ("options",)),
)
# LoaderCache's settings, as ``setup`` writes them; planning puts back what it found
LOADER_CACHE_SETTINGS = ("lora_cache_dir", "hf_cache_dir", "lazy_unpickle", "trust_remote_code",
                         "lora_merge_dtype")
RECORDS = (OUT_CONFIG, CHAT_TEMPLATE, CONVERSION_MAPPING, RENAME_SOURCE_KEY, WEIGHT_RENAMING,
           MERGE_TASK, GATHER_TASK, SAVE_TASK, LOADER_CACHE)


def original(function: Callable) -> Callable:
    """The function as mergekit defines it: without our wrapper, if it is ours."""
    return function.__wrapped__ if getattr(function, MARK, False) else function


def model_out_config(config: Any, arch_info: Any, *, trust_remote_code: bool = False) -> Any:
    return read(OUT_CONFIG)(config, arch_info, trust_remote_code=trust_remote_code)


@contextmanager
def loader_cache_for(options: Any) -> Iterator[None]:
    """mergekit's process-wide ``LoaderCache`` set up with ``options`` inside, then as it was:
    its settings restored, the loaders opened inside flushed and forgotten."""
    read(LOADER_CACHE)
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    settings = {name: getattr(cache, name) for name in LOADER_CACHE_SETTINGS
                if hasattr(cache, name)}
    before = set(cache.loaders)
    cache.setup(options=options)
    try:
        yield
    finally:
        for model in set(cache.loaders) - before:
            cache.loaders.pop(model).flush()
        for name, value in settings.items():
            setattr(cache, name, value)


def forget_loaders(folder: str) -> None:
    """Drop mergekit's cached loaders of ``folder``, whose files a merge has just replaced: a
    later merge in this process (a ``mergekit-multi`` step reading it, the Python API) reads
    the new files, not the set-aside ones its loader still holds open."""
    import os

    if find(LOADER_CACHE)[1] is not None:
        return  # lost (and said so): mergekit's cache stays as mergekit keeps it
    from mergekit.io.tasks import LoaderCache

    cache, target = LoaderCache(), os.path.realpath(folder)
    for model in list(cache.loaders):
        path = getattr(getattr(model, "model", None), "path", None)
        if path is not None and os.path.realpath(os.path.expanduser(path)) == target:
            cache.loaders.pop(model).flush()


def set_chat_template(tokenizer: Any, config: Any) -> None:
    read(CHAT_TEMPLATE)(tokenizer, config)


def planned_task_fields() -> None:
    """The fields of mergekit's planned tasks that the plan reads are all still there."""
    for record in (MERGE_TASK, GATHER_TASK, SAVE_TASK):
        read(record)


def checkpoint_renames(model_type: str | None, names: Iterable[str]) -> dict[str, str | None]:
    """Checkpoint name -> the name mergekit plans with (transformers' v5 renames applied).

    ``None`` for a name that another kind of conversion (fusing several tensors) consumes.
    """
    get_checkpoint_conversion_mapping = read(CONVERSION_MAPPING)
    read(RENAME_SOURCE_KEY)
    weight_renaming = read(WEIGHT_RENAMING)

    transforms = (get_checkpoint_conversion_mapping(model_type) if model_type else None) or []
    found = {}
    for name in names:
        key: str | None = name
        for transform in transforms:
            renamed, pattern = transform.rename_source_key(key)
            if pattern is not None:
                key = renamed if isinstance(transform, weight_renaming) else None
                if key is None:
                    break
        found[name] = key
    return found
