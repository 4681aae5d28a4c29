"""A PEFT LoRA adapter as files: ``adapter_config.json`` + ``adapter_model.safetensors``.

Only what the extrapolation needs is interpreted: the low-rank pairs (``lora_A``/``lora_B``,
``lora_embedding_A``/``lora_embedding_B``), the full tensors of ``modules_to_save`` and the
per-module scaling, and DoRA's magnitude vectors when the caller can handle them. Every other
feature that would make the update anything other than ``scaling · B @ A`` (LoRA biases, trained
base biases, trainable tokens, …) is refused by name, so that no output is silently wrong.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_expo.errors import ExpoError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PAIRS = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}

# config fields that change the update beyond scaling · B @ A: (field, harmless value, why)
UNSUPPORTED = [
    ("use_dora", False, "DoRA's magnitude vector renormalises every row of W + sBA, so the "
     "update is not linear in the scale: a scaled or concatenated adapter is not the step × "
     "(1+α); only a single DoRA adapter is extrapolated (mergekit-expo lora ADAPTER OUT "
     "--base θ₀)"),
    ("lora_bias", False, "lora_B biases are added as well as scaled"),
    ("bias", "none", "the adapter trains the base model's biases"),
    ("trainable_token_indices", None, "the adapter trains single embedding rows"),
    ("target_parameters", None, "the adapter targets nn.Parameters, not modules"),
    ("layer_replication", None, "the adapter duplicates layers of the base model"),
    ("use_qalora", False, "QALoRA pools the input before lora_A"),
    ("alora_invocation_tokens", None, "aLoRA switches the adapter on per token"),
    ("arrow_config", None, "Arrow routes between several adapters"),
    ("use_bdlora", None, "block-diagonal LoRA"),
]


class AdapterError(ExpoError, ValueError):
    """The adapter cannot be extrapolated as asked; the message names the file, key and remedy."""


@dataclass
class LoraPair:
    """One adapted module: update = scaling · B @ A."""

    module: str  # module name inside the model, e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    rank: int
    scaling: float


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]  # adapter_config.json as written
    tensors: dict[str, torch.Tensor]
    pairs: dict[str, LoraPair]  # by module name
    # full tensors: θ₀'s tensor name -> key in the adapter file (modules_to_save, and the
    # weight of a targeted embedding that PEFT saves as ``base_layer``)
    saved: dict[str, str]
    magnitudes: dict[str, str] = field(default_factory=dict)  # DoRA: module -> key

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def dtype(self) -> torch.dtype:
        """The dtype of the lora_B tensors (what PEFT computes the update in)."""
        pair = next(iter(self.pairs.values()), None)
        if pair is None:
            return next(iter(self.tensors.values())).dtype
        return self.tensors[pair.b_key].dtype


def read_adapter(path: str | Path, *, dora: bool = False) -> Adapter:
    """Read and check a local PEFT LoRA adapter directory (DoRA only if ``dora``)."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterError(f"{path}: no {CONFIG_NAME}; expected a PEFT adapter directory")
    if not weights_path.is_file():
        extra = " (adapter_model.bin: re-save it with safetensors)" if (
            path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path}: no {WEIGHTS_NAME}{extra}")
    config = read_config(config_path)
    for option, harmless, why in UNSUPPORTED:
        if dora and option == "use_dora":
            continue
        value = config.get(option, harmless)
        if value not in (harmless, None, False) and value != [] and value != {}:
            raise AdapterError(
                f"{config_path}: {option} = {value!r} is not supported: {why}. Extrapolate the "
                "full model instead: mergekit-yaml with `model: BASE+ADAPTER` and "
                "`merge_method: expo` merges the adapter first (docs/lora.md)."
            )
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # safetensors' own error type: a damaged or truncated file
        raise AdapterError(f"{weights_path} cannot be read: {error}") from None
    pairs, saved, magnitudes = _classify(path, config, tensors)
    for module, pair in pairs.items():
        plain = module in magnitudes and "embedding" not in pair.a_key
        if config.get("use_dora") and (not plain or config.get("fan_in_fan_out")):
            raise AdapterError(
                f"{config_path}: DoRA module {module} is not a plain linear layer with a "
                "magnitude vector; only those are extrapolated exactly. Use the full merge."
            )
    return Adapter(path, config, tensors, pairs, saved, magnitudes)


# The fields of adapter_config.json the extrapolation interprets, and what each must be.
INTERPRETED = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
               "fan_in_fan_out", "modules_to_save", "use_dora")


def read_config(config_path: Path) -> dict[str, Any]:
    """adapter_config.json as PEFT reads it: ``LoraConfig`` fills in PEFT's defaults for the
    fields it leaves out (``r``, ``lora_alpha``, …) and drops keys it does not know (with its
    warning); the fields the extrapolation uses are then checked for their types, which PEFT
    does not do (a string ``lora_alpha`` would fail later, deep inside PEFT or here)."""
    try:
        written = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise AdapterError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(written, dict):
        raise AdapterError(f"{config_path} holds {type(written).__name__}, not a JSON object")
    peft_type = written.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"{config_path}: peft_type is {peft_type!r}; only LoRA adapters (peft_type LORA) "
            "can be extrapolated as an adapter. Merge the adapter into its base model and "
            "extrapolate the full model with mergekit-yaml (`model: base+adapter`)."
        )
    from peft import LoraConfig

    try:
        resolved = LoraConfig.from_peft_type(**written)
    except (TypeError, ValueError) as error:
        raise AdapterError(f"{config_path}: PEFT cannot read this LoRA config: {error}") from None
    config = {**written, **{name: getattr(resolved, name) for name in INTERPRETED}}
    _check_types(config_path, config)
    return config


def _check_types(config_path: Path, config: dict[str, Any]) -> None:
    def refuse(name: str, what: str, value: Any) -> None:
        raise AdapterError(f"{config_path}: {name} must be {what}, got {value!r}")

    if not _is_int(config["r"]) or config["r"] <= 0:
        refuse("r", "a positive integer", config["r"])
    if not _is_number(config["lora_alpha"]):
        refuse("lora_alpha", "a number", config["lora_alpha"])
    for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(config[name], bool):
            refuse(name, "true or false", config[name])
    for name, check, what in (("rank_pattern", _is_int, "a positive integer"),
                              ("alpha_pattern", _is_number, "a number")):
        pattern = config[name] or {}
        if not isinstance(pattern, dict):
            refuse(name, "a mapping of module names to values", pattern)
        for key, value in pattern.items():
            if not check(value) or (name == "rank_pattern" and value <= 0):
                refuse(f"{name}[{key!r}]", what, value)
    saved = config["modules_to_save"]
    if saved is not None and not (
        isinstance(saved, list) and all(isinstance(m, str) for m in saved)
    ):
        refuse("modules_to_save", "a list of module names", saved)
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        refuse("base_model_name_or_path", "a model name or path", base)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def module_scaling(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(rank, scaling) of one module as PEFT computes it: lora_alpha / r, or / √r with rsLoRA
    (PEFT's pattern matching is imported only for per-module ranks or alphas)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank = config["r"]
    if rank_pattern:
        from peft.utils.other import get_pattern_key

        rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), rank)
    alpha = config["lora_alpha"]
    if alpha_pattern:
        from peft.utils.other import get_pattern_key

        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha)
    if config.get("use_rslora"):
        return rank, alpha / math.sqrt(rank)
    return rank, alpha / rank


def _classify(path: Path, config, tensors):
    pairs: dict[str, LoraPair] = {}
    saved: dict[str, str] = {}
    magnitudes: dict[str, str] = {}
    pattern = re.compile(r"^(.*)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?$")
    for key in tensors:
        name = key.removeprefix(PREFIX)
        match = pattern.match(name)
        if match is None:
            if name.endswith(".lora_magnitude_vector") and config.get("use_dora"):
                magnitudes[name.removesuffix(".lora_magnitude_vector")] = key
                continue
            if ".lora_" in name or "magnitude" in name:
                raise AdapterError(f"{path / WEIGHTS_NAME}: tensor {key} is not a LoRA A/B pair")
            # PEFT saves a targeted embedding's own weight (save_embedding_layers) as base_layer
            saved[name.replace(".base_layer.", ".")] = key
            continue
        module, kind = match.group(1), match.group(2)
        if kind not in PAIRS:
            continue
        b_key = key.replace(f".{kind}", f".{PAIRS[kind]}")
        if b_key not in tensors:
            raise AdapterError(f"{path / WEIGHTS_NAME}: {key} has no {PAIRS[kind]} partner")
        rank, scaling = module_scaling(config, module)
        if tensors[key].shape[0] != rank and kind == "lora_A":
            raise AdapterError(
                f"{path / WEIGHTS_NAME}: {key} has rank {tensors[key].shape[0]}, but "
                f"{CONFIG_NAME} (r, rank_pattern) gives {rank} for {module}"
            )
        pairs[module] = LoraPair(module, key, b_key, rank, scaling)
    for name, key in saved.items():
        module = name.rsplit(".", 1)[0]
        listed = config.get("modules_to_save") or []
        embedding = ".base_layer." in key and module in pairs
        if not embedding and not any(module == m or module.endswith("." + m) for m in listed):
            raise AdapterError(
                f"{path / WEIGHTS_NAME}: tensor {PREFIX}{name} is neither a LoRA pair nor in "
                f"modules_to_save {listed}; cannot tell what it changes"
            )
    return pairs, saved, magnitudes


def read_base_tensors(base: str | Path, names) -> dict[str, torch.Tensor]:
    """The named tensors of a local safetensors checkpoint (sharded or not)."""
    from safetensors import safe_open

    base = Path(base)
    tensors = {}
    for file, wanted in _base_files(base, names).items():
        with safe_open(str(base / file), framework="pt") as handle:
            present = set(handle.keys())
            for name in wanted:
                if name not in present:
                    raise AdapterError(f"{base / file}: tensor {name} of θ₀ is missing")
                tensors[name] = handle.get_tensor(name)
    return tensors


def base_shapes(base: str | Path, names) -> dict[str, tuple[int, ...] | None]:
    """The shapes of the named tensors of a local safetensors checkpoint, from its headers
    (None for a tensor it does not hold)."""
    from safetensors import safe_open

    base = Path(base)
    shapes: dict[str, tuple[int, ...] | None] = dict.fromkeys(names)
    for file, wanted in _base_files(base, names, missing_ok=True).items():
        with safe_open(str(base / file), framework="pt") as handle:
            present = set(handle.keys())
            for name in wanted:
                if name in present:
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _base_files(base: Path, names, *, missing_ok: bool = False) -> dict[str, list[str]]:
    """The checkpoint's files and the named tensors to look for in each."""
    index = base / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    elif (base / "model.safetensors").is_file():
        weight_map = None
    else:
        raise AdapterError(f"{base}: no model.safetensors(.index.json); need the base model θ₀")
    by_file: dict[str, list[str]] = {}
    for name in names:
        file = "model.safetensors" if weight_map is None else weight_map.get(name)
        if file is None:
            if missing_ok:
                continue
            raise AdapterError(f"{base}: tensor {name} (in modules_to_save) is not in θ₀")
        by_file.setdefault(file, []).append(name)
    return by_file


def write_adapter(
    out: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], *,
    card: str, record: dict[str, Any],
) -> Path:
    """Write adapter_config.json, adapter_model.safetensors, README.md and mergekit_expo.json
    into ``out`` (the staging folder of ``expo_adapter``: the output folder gets them all at
    once, the config last)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                   encoding="utf-8")
    (out / "mergekit_expo.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(card, encoding="utf-8")
    return out
