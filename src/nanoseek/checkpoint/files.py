"""A checkpoint directory's tensors: model.safetensors, or the shards model.safetensors.index.json lists, read
lazily; quantized weights (checkpoint/fp8.py's formats) handed out dequantized, or as stored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from nanoseek.checkpoint.fp8 import Quantization
from nanoseek.errors import CheckpointError
from nanoseek.fp8.fp4 import dequantize_fp4
from nanoseek.fp8.quant import dequantize_blocks

INDEX_FILE = "model.safetensors.index.json"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = (".weight_scale_inv", ".scale")  # V3's fp32 inverse scales, V4's ue8m0 ones


def _shard_files(path: Path) -> list[str]:
    index = path / INDEX_FILE
    if not index.exists():
        return sorted(p.name for p in path.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # bad JSON or UTF-8, no weight_map
        raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
    # shard names are plain file names in this directory: an index must not point elsewhere on the disk
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and name and Path(name).name == name and name not in (".", "..")
        for name in weight_map.values()
    ):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files in {path}")
    files = sorted(set(weight_map.values()))
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{index} names {len(missing)} shard(s) that are not in {path}, e.g. {missing[0]}")
    return files


class SafetensorsDir:
    """Lazy access to every tensor of a checkpoint directory whose config.json announced `quantization`."""

    def __init__(self, path: Path, quantization: Quantization | None = None):
        files = _shard_files(path)
        if not files:
            raise CheckpointError(f"no *.safetensors weights in {path}")
        self.quantization = quantization
        self.location: dict[str, str] = {}
        self.handles = {}
        for name in files:
            try:
                handle = safe_open(str(path / name), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read {path / name} (truncated or not safetensors?): {e}") from None
            self.handles[name] = handle
            self.location.update({key: name for key in handle.keys()})
        self.used: set[str] = set()
        self.stored_as: dict[str, str] = {}  # a tensor's name in the files, where `rename` gave it another

    def rename(self, aliases: dict[str, str]) -> None:
        """Reads each tensor `old` of `aliases` under its new name (another exporter's names for the same tensor)."""
        for old, new in aliases.items():
            self.location[new] = self.location.pop(old)
        self.stored_as = {new: old for old, new in aliases.items()}

    def __contains__(self, key: str) -> bool:
        return key in self.location

    def numel(self, key: str) -> int:
        return math.prod(self.handles[self.location[key]].get_slice(key).get_shape())

    def _read(self, key: str) -> torch.Tensor:
        if key not in self.location:
            raise CheckpointError(f"checkpoint is missing tensor {key!r}")
        self.used.add(key)
        try:
            return self.handles[self.location[key]].get_tensor(self.stored_as.get(key, key))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {key!r} (truncated file?): {e}") from None

    def _scale_of(self, key: str, what: str) -> torch.Tensor:
        stem = key.removesuffix(".weight")
        for suffix in SCALE_SUFFIXES:
            if stem + suffix in self.location:
                scale = self._read(stem + suffix)
                if not scale.dtype.is_floating_point:
                    raise CheckpointError(f"tensor {stem + suffix!r} is {scale.dtype}; a scale is fp32 or ue8m0")
                return scale
        raise CheckpointError(f"{what} tensor {key!r} has no {stem + '.weight_scale_inv'!r} or {stem + '.scale'!r}")

    def stored(self, key: str) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        """A quantized weight as the files hold it: (values, scale, "fp8" or "fp4"); None for one stored plain."""
        dtype = self.dtype(key)
        if dtype in FP8_DTYPES:
            return self._read(key), self._scale_of(key, "FP8"), "fp8"
        if dtype == torch.int8 and not key.endswith(".tid2eid"):
            if self.quantization is None or self.quantization.expert_dtype != "fp4":
                raise CheckpointError(
                    f"tensor {key!r} is int8 (FP4, two values a byte) but config.json's expert_dtype is "
                    f"{None if self.quantization is None else self.quantization.expert_dtype!r}, not 'fp4'"
                )
            return self._read(key), self._scale_of(key, "FP4"), "fp4"
        return None

    def dtype(self, key: str) -> torch.dtype:
        if key not in self.location:
            raise CheckpointError(f"checkpoint is missing tensor {key!r}")
        name = self.handles[self.location[key]].get_slice(self.stored_as.get(key, key)).get_dtype()
        return _SAFETENSORS_DTYPES.get(name, torch.uint8)

    def get(self, key: str) -> torch.Tensor:
        """Tensor `key`, dequantized (fp32) where the files hold it quantized."""
        stored = self.stored(key)
        if stored is not None:
            values, scale, encoding = stored
            try:
                return dequantize_fp4(values, scale) if encoding == "fp4" else dequantize_blocks(values, scale)
            except ValueError as e:
                raise CheckpointError(f"{key}: {e}") from None
        tensor = self._read(key)
        if key.endswith(".tid2eid"):  # V4's hash-routing table: expert ids per token
            if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
                raise CheckpointError(f"tensor {key!r} is {tensor.dtype}; a hash-routing table holds integers")
            return tensor.long()
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"tensor {key!r} is {tensor.dtype}; weights are floating point")
        return tensor


_SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I32": torch.int32,
    "I64": torch.int64,
}
