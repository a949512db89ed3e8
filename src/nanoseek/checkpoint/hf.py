"""HF or DeepSeek checkpoint directory ⇄ nanoseek model: config.json + model.safetensors, or shards listed in
model.safetensors.index.json, FP8 blocks dequantized on load. Which file tensor makes which of ours is each
generation's checkpoint.py (models/registry.py): experts stored one per key are stacked on load and split on save.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.checkpoint.fp8 import FP8_QUANTIZATION_CONFIG, quantize_state_dict
from nanoseek.config import ModelConfig
from nanoseek.errors import CheckpointError, ConfigError, describe_write_failure, first_line
from nanoseek.fp8.quant import dequantize_blocks
from nanoseek.models.common.checkpoint import Entry, halves_to_interleaved, interleaved_to_halves
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.registry import architecture, build_model

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_entries(config: ModelConfig) -> list[Entry]:
    """Every tensor of the config's model and where it lives in the files (its generation's checkpoint.py)."""
    return architecture(config).checkpoint.entries(config)


# ---- reading ------------------------------------------------------------------------------------------------------
class SafetensorsDir:
    """Lazy access to every tensor of a checkpoint directory, FP8 blocks dequantized on the way out."""

    def __init__(self, path: Path):
        index = path / INDEX_FILE
        if index.exists():
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
                raise CheckpointError(
                    f"{index} names {len(missing)} shard(s) that are not in {path}, e.g. {missing[0]}"
                )
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors weights in {path}")
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

    def get(self, key: str) -> torch.Tensor:
        if key not in self.location:
            raise CheckpointError(f"checkpoint is missing tensor {key!r}")
        self.used.add(key)
        try:
            tensor = self.handles[self.location[key]].get_tensor(self.stored_as.get(key, key))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {key!r} (truncated file?): {e}") from None
        if key.endswith(".tid2eid"):  # V4's hash-routing table: expert ids per token
            if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
                raise CheckpointError(f"tensor {key!r} is {tensor.dtype}; a hash-routing table holds integers")
            return tensor.long()
        if not tensor.dtype.is_floating_point:
            raise CheckpointError(f"tensor {key!r} is {tensor.dtype}; weights are floating point")
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_key = key.removesuffix(".weight") + ".weight_scale_inv"
            if scale_key not in self.location:
                raise CheckpointError(f"FP8 tensor {key!r} has no {scale_key!r}")
            try:
                tensor = dequantize_blocks(tensor, self.get(scale_key))
            except ValueError as e:
                raise CheckpointError(f"{key}: {e}") from None
        return tensor


def _assemble(entry: Entry, source: SafetensorsDir, shape: torch.Size, config: ModelConfig) -> torch.Tensor:
    if entry.ours.endswith("expert_bias") and entry.parts[0][0] not in source and config.scoring_func == "softmax":
        return torch.zeros(shape)  # V2 checkpoints predate aux-loss-free balancing (later ones route with it)
    if entry.stacked and entry.parts[0][0] not in source:  # transformers-5 may store experts fused
        experts_prefix = entry.parts[0][0].rsplit(".", 3)[0]  # model.layers.N.mlp.experts
        return source.get(f"{experts_prefix}.{'gate_up_proj' if len(entry.parts[0]) == 2 else 'down_proj'}")
    slices = [
        torch.cat([source.get(k) for k in keys]) if len(keys) > 1 else source.get(keys[0]) for keys in entry.parts
    ]
    if entry.rope_head_dim and slices[0].shape[0] % entry.rope_head_dim == 0:
        return halves_to_interleaved(slices[0], entry.rope_head_dim)
    return torch.stack(slices) if entry.stacked else slices[0]


def _mtp_layers_present(config: ModelConfig, source: SafetensorsDir) -> int:
    found, layout = 0, architecture(config).checkpoint
    while found < config.num_nextn_predict_layers:
        if layout.mtp_key(config, found) not in source:
            break
        found += 1
    return found


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are ~50x slower there), bf16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def load_pretrained(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> DeepseekV3Model:
    """A nanoseek model from a HF DeepSeek-V2/V3 directory (FP8 weights are dequantized)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a model directory: no config.json")
    try:
        config = ModelConfig.load_json(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    source = SafetensorsDir(path)
    source.rename(architecture(config).checkpoint.aliases(source.location))
    mtp_layers = _mtp_layers_present(config, source)
    if mtp_layers < config.num_nextn_predict_layers:
        warnings.warn(
            f"{path}: config lists {config.num_nextn_predict_layers} MTP layers but the weights hold "
            f"{mtp_layers}; loading without the missing ones",
            stacklevel=2,
        )
        config = config.replace(num_nextn_predict_layers=mtp_layers)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = build_model(config)
    # cast on meta: the weights are allocated on the device in their dtype, never first in fp32 (the routing biases
    # and RoPE table stay fp32: KeepsFp32Buffers)
    model.to(dtype or default_dtype(device))
    expected = model.state_dict()  # shapes only: nothing is allocated until the weights match them
    state = {}
    for entry in checkpoint_entries(config):
        try:
            tensor = _assemble(entry, source, expected[entry.ours].shape, config)
        except (RuntimeError, ValueError) as e:  # pieces whose shapes cannot be joined or reordered
            raise CheckpointError(
                f"{entry.parts[0][0]}: {first_line(e)} (does config.json match the weights?)"
            ) from None
        if tensor is None:
            raise CheckpointError(f"checkpoint is missing tensor {entry.parts[0][0]!r}")
        if tensor.shape != expected[entry.ours].shape:
            raise CheckpointError(
                f"{entry.parts[0][0]}: shape {tuple(tensor.shape)} does not match config.json "
                f"(expects {tuple(expected[entry.ours].shape)})"
            )
        state[entry.ours] = tensor
    model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    unexpected = [
        k for k in source.location if k not in source.used and not _written_not_read(k, config) and source.numel(k)
    ]  # transformers writes empty shared experts when there are none
    if unexpected:
        raise CheckpointError(
            f"checkpoint tensor {unexpected[0]!r} has no place in this config ({len(unexpected)} unexpected tensors)"
        )
    model.reset_buffers()
    return model


def _written_not_read(key: str, config: ModelConfig) -> bool:
    """Tensors a checkpoint may carry that we ignore: RoPE tables some exporters store, and what the generation's
    layout names (copies of shared tensors, MTP layers beyond the ones the config asks for)."""
    return key.endswith("rotary_emb.inv_freq") or architecture(config).checkpoint.written_not_read(key, config)


# ---- writing ------------------------------------------------------------------------------------------------------
def to_hf_state_dict(model: DeepseekV3Model) -> dict[str, torch.Tensor]:
    config = model.config
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for entry in checkpoint_entries(config):
        if config.tie_word_embeddings and entry.ours == "head.weight":
            continue
        tensor = ours[entry.ours].detach()
        if entry.rope_head_dim:
            tensor = interleaved_to_halves(tensor, entry.rope_head_dim)
        for piece, keys in zip(tensor.unbind(0) if entry.stacked else [tensor], entry.parts):
            for key, chunk in zip(keys, piece.chunk(len(keys))):
                out[key] = chunk.contiguous().clone()
    for key, name in architecture(config).checkpoint.shared_copies(config).items():
        out[key] = ours[name].detach().clone()
    return out


def save_pretrained(
    model: DeepseekV3Model, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30, fp8: bool = False
) -> list[str]:
    """Writes config.json and safetensors (sharded with an index past max_shard_bytes) that transformers and
    load_pretrained read; `fp8` writes DeepSeek-V3's FP8 checkpoint format. Every file is written under a temporary
    name and renamed, so an interrupted save never leaves a half-written file under a real name. Returns the tensor
    names written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    if fp8:
        tensors = quantize_state_dict(tensors)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        tmp = path / f".{name}.tmp"
        try:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        except Exception as e:  # safetensors' own error type, or an OSError: a full disk, a file-size limit
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"cannot write {path / name}: {describe_write_failure(path, e)}") from None
        os.replace(tmp, path / name)
    stale = path / (INDEX_FILE if len(shards) == 1 else "model.safetensors")
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: n for n, shard in zip(names, shards) for k in shard},
        }
        _write_text_atomic(path / INDEX_FILE, json.dumps(index, indent=2))
    stale.unlink(missing_ok=True)
    config = model.config.to_hf_dict()
    if fp8:
        config["quantization_config"] = FP8_QUANTIZATION_CONFIG
    _write_text_atomic(path / "config.json", json.dumps(config, indent=2) + "\n")
    return list(tensors)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
