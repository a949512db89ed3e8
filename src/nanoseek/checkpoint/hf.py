"""HF or DeepSeek checkpoint directory ⇄ nanoseek model: config.json + model.safetensors, or shards listed in
model.safetensors.index.json. Quantized weights (DeepSeek's FP8 and FP4) are dequantized on load, or kept as
released (`quantized=True`: checkpoint/resident.py). Which file tensor makes which of ours is each generation's
checkpoint.py (models/registry.py): experts stored one per key are stacked on load and split on save.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from nanoseek.checkpoint.files import INDEX_FILE, SafetensorsDir
from nanoseek.checkpoint.fp8 import quantized_release, read_quantization, released_bytes
from nanoseek.checkpoint.resident import install_stored, stored_entry, swappable
from nanoseek.config import ModelConfig
from nanoseek.errors import CheckpointError, ConfigError, describe_write_failure, first_line
from nanoseek.fp8.stored import StoredWeight, dequantized_state_dict
from nanoseek.models.common.checkpoint import Entry, halves_to_interleaved, interleaved_to_halves
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.registry import architecture, build_model


def checkpoint_entries(config: ModelConfig) -> list[Entry]:
    """Every tensor of the config's model and where it lives in the files (its generation's checkpoint.py)."""
    return architecture(config).checkpoint.entries(config)


# ---- reading ------------------------------------------------------------------------------------------------------
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


def read_config(path: Path) -> tuple[ModelConfig, dict]:
    """A checkpoint directory's config and its raw config.json."""
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a model directory: no config.json")
    try:
        raw = json.loads((path / "config.json").read_bytes())
        return ModelConfig.from_hf_dict(raw), raw
    except (ConfigError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {first_line(e)}") from None


def load_pretrained(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    quantized: bool = False,
) -> DeepseekV3Model:
    """A nanoseek model from a HF or DeepSeek release directory (V2, V3, V3.2, V4). Quantized weights are
    dequantized into `dtype`, or with `quantized` kept as released (FP8 1 byte, FP4 half a byte a parameter, plus
    scales) and dequantized tile by tile inside their GEMMs: for inference; such a model does not train."""
    path = Path(path)
    config, raw = read_config(path)
    source = SafetensorsDir(path, read_quantization(raw))
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
    # and RoPE table stay fp32: KeepsDtype)
    model.to(dtype or default_dtype(device))
    expected = model.state_dict()  # shapes only: nothing is allocated until the weights match them
    state = {}
    stored = {}
    for entry in checkpoint_entries(config):
        try:
            kept = stored_entry(entry, source) if quantized else None
            if kept is not None:
                stored[entry.ours] = kept
                continue
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
    state |= _install(model, stored, expected, source)
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


def _install(
    model: nn.Module, stored: dict[str, tuple], expected: dict[str, torch.Tensor], source: SafetensorsDir
) -> dict[str, torch.Tensor]:
    """Puts the weights that stay quantized into modules that hold them (the others dequantized into the model's
    dtype); returns the state-dict entries of both."""
    state = {}
    kept = swappable(model, stored)
    for name, (values, scale, encoding) in stored.items():
        weight = StoredWeight(values, scale, encoding)
        if tuple(weight.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{name}: stored shape {tuple(weight.shape)} does not match config.json (expects "
                f"{tuple(expected[name].shape)})"
            )
        if name not in kept:
            state[name] = weight.dequantize(expected[name].dtype)
    return state | install_stored(model, kept)


def _written_not_read(key: str, config: ModelConfig) -> bool:
    """Tensors a checkpoint may carry that we ignore: RoPE tables some exporters store, and what the generation's
    layout names (copies of shared tensors, MTP layers beyond the ones the config asks for)."""
    return key.endswith("rotary_emb.inv_freq") or architecture(config).checkpoint.written_not_read(key, config)


# ---- writing ------------------------------------------------------------------------------------------------------
def to_hf_state_dict(model: DeepseekV3Model) -> dict[str, torch.Tensor]:
    config = model.config
    ours = dequantized_state_dict(model)
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


def meta_tensors(config: ModelConfig) -> dict[str, torch.Tensor]:
    """A model's tensors under to_hf_state_dict's names, in bf16 (what stays fp32, KeepsDtype, so), on meta."""
    with torch.device("meta"):
        model = build_model(config)
    return to_hf_state_dict(model.to(torch.bfloat16))


def weight_bytes(config: ModelConfig, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """A model's weight bytes (or those of `tensors`, part of its meta_tensors) without allocating it: in bf16, and
    as DeepSeek releases its generation quantized (the bytes `load_pretrained(quantized=True)` keeps resident)."""
    tensors = meta_tensors(config) if tensors is None else tensors
    return {
        "bf16": sum(t.numel() * 2 for t in tensors.values()),
        "released": released_bytes(config, tensors),
    }


def save_pretrained(
    model: DeepseekV3Model, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30, fp8: bool = False
) -> list[str]:
    """Writes config.json and safetensors (sharded with an index past max_shard_bytes) that transformers and
    load_pretrained read; `fp8` writes DeepSeek's quantized release of the model's generation (V3's FP8 format, V4's
    FP8 + FP4 in its own names and config form: checkpoint/fp8.py). Every file is written under a temporary
    name and renamed, so an interrupted save never leaves a half-written file under a real name. Returns the tensor
    names written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, config = to_hf_state_dict(model), model.config.to_hf_dict()
    if fp8:
        tensors, config = quantized_release(model.config, tensors)
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
    _write_text_atomic(path / "config.json", json.dumps(config, indent=2) + "\n")
    return list(tensors)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
