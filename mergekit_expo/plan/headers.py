"""What a safetensors checkpoint holds, from its headers alone: names, dtypes, shapes, files.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range)
and the data. Reading the headers costs kilobytes per file and tells a truncated or corrupt file
(data shorter than the header promises, a header that is not JSON, a shard the index names but
that is missing) before mergekit reads a single tensor, and names the file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mergekit_expo.errors import ExpoError

# safetensors dtype codes -> torch dtype names (as mergekit's `dtype:` spells them)
DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# Headers are small; anything larger than this is not a safetensors header (a corrupt length).
MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ExpoError, ValueError):
    """A checkpoint file is missing, truncated or corrupt; the message names the file."""


@dataclass(frozen=True)
class TensorHeader:
    name: str
    dtype: str  # torch name, e.g. "bfloat16"
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def read_file_header(path: str | os.PathLike) -> dict[str, TensorHeader]:
    """The tensors of one ``.safetensors`` file; raise naming the file if it is damaged."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{path} is truncated ({size} bytes; not even a safetensors header). "
                "Re-download or re-export this checkpoint."
            )
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header claims {length} "
                f"bytes but the file has {size}. Re-download or re-export this checkpoint."
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(
                f"{path} has a corrupt safetensors header ({error}). Re-download or re-export "
                "this checkpoint."
            ) from None
    header.pop("__metadata__", None)
    tensors, end = {}, 0
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not a JSON object). "
                              "Re-download or re-export this checkpoint.")
    for name, entry in header.items():
        try:
            begin, stop = (int(v) for v in entry["data_offsets"])
            dtype = DTYPES.get(entry["dtype"], str(entry["dtype"]).lower())
            shape = tuple(int(size) for size in entry["shape"])
            if not 0 <= begin <= stop:
                raise ValueError(f"offsets {begin}..{stop}")
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"{path} has a corrupt safetensors header: the entry of tensor {name} is "
                f"unreadable ({type(error).__name__}: {error}). Re-download or re-export this "
                "checkpoint."
            ) from None
        end = max(end, stop)
        tensors[name] = TensorHeader(name, dtype, shape, path)
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + length + end} bytes of tensors "
            f"but the file has {size} (an interrupted download or copy?). Re-download or "
            "re-export this checkpoint."
        )
    if 8 + length + end < size:  # safetensors refuses such a file too, less clearly
        raise CheckpointError(
            f"{path} is corrupt: {size - 8 - length - end} bytes follow the tensors its header "
            "describes. Re-download or re-export this checkpoint."
        )
    return tensors


def read_checkpoint(model_dir: str | os.PathLike) -> dict[str, TensorHeader] | None:
    """Every tensor of a safetensors checkpoint folder (sharded or not), headers only.

    ``None`` if the folder holds no safetensors weights (e.g. ``pytorch_model.bin``: mergekit
    reads those itself). The index must be complete: every shard it names exists and holds the
    tensors the index places in it.
    """
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as error:
            raise CheckpointError(
                f"{index} is not a complete safetensors index ({type(error).__name__}: "
                f"{error}). Re-download or re-export this checkpoint."
            ) from None
        tensors: dict[str, TensorHeader] = {}
        for shard in sorted(set(weight_map.values())):
            path = model_dir / shard
            if not path.exists():
                raise CheckpointError(f"{path} is listed in {index} but does not exist.")
            tensors.update(read_file_header(path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(
                f"{index} names {len(missing)} tensors that its shards do not hold "
                f"(first: {missing[0]} in {model_dir / weight_map[missing[0]]})."
            )
        return tensors
    single = model_dir / SINGLE_NAME
    if single.exists():
        return read_file_header(single)
    return None


def looks_local(path: str) -> bool:
    """A filesystem path, not a Hugging Face repo id (``org/name``)."""
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or "\\" in path
    )


def local_dir(reference) -> str | None:
    """The folder of a model given as a local path without a LoRA; None otherwise."""
    path = os.path.expanduser(reference.model.path)
    return path if reference.lora is None and os.path.isdir(path) else None


def read_model_headers(config) -> tuple[dict, list[tuple[str, str]]]:
    """The safetensors headers of every local input of ``config``, and (where, message) for
    each damaged one (the message names the file)."""
    from mergekit_expo.plan.scopes import model_places

    headers, damaged = {}, []
    for where, reference in model_places(config):
        if reference in headers:
            continue
        path = local_dir(reference)
        if path is None:
            continue
        try:
            found = read_checkpoint(path)
        except (CheckpointError, OSError) as error:
            damaged.append((where, f"{error} ({where}: {reference})"))
            continue
        if found is not None:
            headers[reference] = found
    return headers, damaged
