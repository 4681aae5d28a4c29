"""The search's methods inside each vLLM worker: load a chunk of weights in place, read them back.

vLLM mixes this class into its worker (``worker_extension_cls``) and the driver calls its methods
by name through ``LLM.collective_rpc``: no code is pickled. Tensors arrive under their
checkpoint (Hugging Face) names; the model's own ``load_weights`` puts each into its fused
parameter (``q_proj``/``k_proj``/``v_proj`` → ``qkv_proj``, ``gate_proj``/``up_proj`` →
``gate_up_proj``). :meth:`expo_read` maps those back, so the driver can compare every tensor
the engine computes with against the merged safetensors.

On a CPU, vLLM repacks each linear weight for oneDNN after loading and drops the plain copy;
a layer that receives new weights gets its plain tensor back and is packed again from it, and
keeps that plain tensor (the engine then holds the linear weights twice on a CPU; on a GPU the
parameters are used as loaded).

This module imports only torch at the top: vLLM imports it in every worker.
"""

from __future__ import annotations

import os
import time
import zlib

import torch


def fingerprint(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes: one pass at memory speed. Any change confined to one element
    (≤ 32 bits, a burst) changes it with certainty; any other change, with odds 1 − 2⁻³²."""
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    bits = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[
        flat.element_size()])
    return zlib.crc32(bits.numpy()) ^ (flat.numel() << 32)


Packed = tuple[str, str, list[int], bytes]  # name, dtype, shape, raw bytes
Placed = tuple[str, str, list[int], int]  # name, dtype, shape, byte offset in a shared buffer
ALIGN = 64  # bytes: every tensor in a shared buffer starts on a cache line


def pack(name: str, tensor: torch.Tensor) -> Packed:
    """A tensor as plain values: vLLM's RPC carries bytes, not tensors, in a method's arguments."""
    tensor = tensor.detach().cpu().contiguous()
    raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), raw


def unpack(packed: Packed) -> tuple[str, torch.Tensor]:
    name, dtype, shape, raw = packed
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return name, flat.view(getattr(torch, dtype)).reshape(shape)


def map_shared(path: str, size: int) -> torch.Tensor:
    """The bytes of a shared-memory file, mapped (writes are seen by every process mapping it)."""
    return torch.from_file(path, shared=True, size=size, dtype=torch.uint8)


def placed_view(buffer: torch.Tensor, placed: Placed) -> torch.Tensor:
    """The tensor :data:`Placed` describes, as a view of ``buffer`` (no copy)."""
    _, dtype, shape, offset = placed
    dtype = getattr(torch, dtype)
    count = 1
    for size in shape:
        count *= size
    return buffer[offset:offset + count * dtype.itemsize].view(dtype).view(shape)


class ExpoWorkerExtension:
    """Methods vLLM adds to its worker class (``self`` is the worker)."""

    def _expo_model(self) -> torch.nn.Module:
        return self.model_runner.model

    def expo_load(self, weights: list[Packed]) -> dict:
        """Load checkpoint-named tensors sent as bytes (:func:`pack`) into the running model."""
        return self._expo_load_tensors([unpack(packed) for packed in weights])

    def expo_load_shared(self, path: str, size: int, placed: list[Placed]) -> dict | None:
        """Load tensors the driver wrote into the shared-memory file ``path`` (only their names
        and offsets travel through the RPC); ``None`` where this worker cannot see the file
        (another host): the driver then sends bytes. The mapping is kept for the next calls:
        the driver removes the file once every worker has mapped it."""
        buffers = self.__dict__.setdefault("_expo_buffers", {})
        if path not in buffers or buffers[path].numel() != size:
            if not os.path.exists(path):
                return None
            buffers.clear()  # the driver has one buffer at a time
            buffers[path] = map_shared(path, size)  # kept: the driver unlinks the file
        return self._expo_load_tensors([(p[0], placed_view(buffers[path], p)) for p in placed])

    def _expo_load_tensors(self, tensors: list[tuple[str, torch.Tensor]]) -> dict:
        """Every layer whose plain weight was dropped after packing gets it back first; returns
        the vLLM parameters written and the seconds spent loading and repacking."""
        model = self._expo_model()
        device = next(model.parameters()).device
        started = time.perf_counter()
        _restore_plain_weights(model)
        loaded = model.load_weights(weights=[(n, t.to(device)) for n, t in tensors])
        loaded_at = time.perf_counter()
        _repack(model, set(loaded))
        return {"loaded": sorted(loaded), "load_seconds": loaded_at - started,
                "repack_seconds": time.perf_counter() - loaded_at}

    def expo_read(self, names: list[str] | None = None) -> list[Packed]:
        """The tensors the engine computes with, under checkpoint names (:func:`pack`ed)."""
        return [pack(name, tensor) for name, tensor in self._expo_views(names).items()]

    def expo_fingerprints(self, names: list[str] | None = None) -> dict[str, int]:
        """:func:`fingerprint` of each tensor :meth:`expo_read` would return."""
        return {name: fingerprint(tensor) for name, tensor in self._expo_views(names).items()}

    def _expo_views(self, names: list[str] | None) -> dict[str, torch.Tensor]:
        model = self._expo_model()
        packed = getattr(model, "packed_modules_mapping", {}) or {}
        wanted = None if names is None else set(names)
        views: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        for name, parameter in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            module = modules.get(owner)
            prefix, _, fused = owner.rpartition(".")
            parts = packed.get(fused)
            sizes = getattr(module, "output_sizes", None)
            if parts and sizes and leaf in ("weight", "bias") and len(parts) == len(sizes):
                start = 0
                for part, size in zip(parts, sizes, strict=True):
                    views[f"{prefix}.{part}.{leaf}".lstrip(".")] = parameter[start:start + size]
                    start += size
                continue
            rows = getattr(module, "org_vocab_size", None)  # vocabulary padded to a multiple
            views[name] = parameter[:rows] if rows is not None and leaf == "weight" else parameter
        if wanted is None:
            return views
        return {name: views[name] for name in wanted if name in views}


def _cpu_linear_layers(model: torch.nn.Module):
    for module in model.modules():
        if hasattr(module, "cpu_linear") and hasattr(module, "quant_method"):
            yield module


def _restore_plain_weights(model: torch.nn.Module) -> None:
    """A CPU linear layer whose weight vLLM dropped after packing gets an empty full-size one
    (filled by the load that follows: the first update writes every tensor)."""
    for module in _cpu_linear_layers(model):
        weight = module.weight
        if weight.numel() == 0:
            rows = sum(module.output_partition_sizes)
            shape = (rows, module.input_size_per_partition)
            plain = torch.nn.Parameter(
                torch.empty(shape, dtype=weight.dtype, device=weight.device),
                requires_grad=False)
            # what vLLM's loaders read off a linear weight (the packed one dropped them)
            plain.weight_loader, plain.output_dim, plain.input_dim = module.weight_loader, 0, 1
            module.weight = plain


def _repack(model: torch.nn.Module, loaded: set[str]) -> None:
    """Pack again (CPU) every linear layer whose weight was just loaded, keeping the plain one."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    touched = {name.rpartition(".")[0] for name in loaded}
    shared = {model.get_parameter(name).data_ptr() for name in loaded}
    for owner, module in model.named_modules():
        if not hasattr(module, "cpu_linear"):
            continue
        weight = getattr(module, "weight", None)
        if owner in touched or (weight is not None and weight.data_ptr() in shared):
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
