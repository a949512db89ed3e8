"""HF DeepSeek-V2/V3 (or, for the dense baseline, Llama) checkpoint directory ⇄ nanoseek model. The only module
that knows HF parameter names.

Layout (DeepSeek's release and transformers' DeepseekV3ForCausalLM): config.json + model.safetensors, or shards
listed in model.safetensors.index.json. Experts are stored one per key (`mlp.experts.E.gate_proj.weight`); ours are
stacked [E, out, in] with gate and up fused, so loading stacks and saving splits. MTP module k is stored as layer
num_hidden_layers + k, with copies of the shared embedding and head that we write but never read.
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

from nanoseek.checkpoint.entry import Entry
from nanoseek.checkpoint.fp8 import FP8_QUANTIZATION_CONFIG, quantize_state_dict
from nanoseek.checkpoint.hf_v4 import mtp_key, release_aliases, v4_entries
from nanoseek.config import ModelConfig
from nanoseek.errors import CheckpointError, ConfigError, describe_write_failure, first_line
from nanoseek.fp8.quant import dequantize_blocks
from nanoseek.llama import halves_to_interleaved, interleaved_to_halves
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.registry import build_model

_ATTENTION = {
    "q_proj": "q_proj",
    "q_down": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "q_up": "q_b_proj",
    "kv_down": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "kv_up": "kv_b_proj",
    "out_proj": "o_proj",
    "k_proj": "k_proj",
    "v_proj": "v_proj",
}
# V3.2's lightning indexer: ours → transformers' (and DeepSeek's release) names under self_attn.indexer
_INDEXER = {
    "q_up.weight": "wq_b.weight",
    "k_proj.weight": "wk.weight",
    "k_norm.weight": "k_norm.weight",
    "k_norm.bias": "k_norm.bias",
    "head_weights.weight": "weights_proj.weight",
}
INDEX_FILE = "model.safetensors.index.json"


def _mlp_entries(ours: str, hf: str) -> list[Entry]:
    return [
        Entry(f"{ours}.gate_up.weight", ((f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"),)),
        Entry(f"{ours}.down.weight", ((f"{hf}.down_proj.weight",),)),
    ]


def _attention_entries(config: ModelConfig, ours: str, hf: str) -> list[Entry]:
    if config.attention_type == "gqa":
        return [
            Entry(
                f"{ours}.attn.{n}.weight",
                ((f"{hf}.self_attn.{_ATTENTION[n]}.weight",),),
                rope_head_dim=config.head_dim if n in ("q_proj", "k_proj") else 0,
            )
            for n in ("q_proj", "k_proj", "v_proj", "out_proj")
        ]
    names = ["kv_down", "kv_norm", "kv_up", "out_proj"]
    names += ["q_proj"] if config.q_lora_rank is None else ["q_down", "q_norm", "q_up"]
    entries = [Entry(f"{ours}.attn.{n}.weight", ((f"{hf}.self_attn.{_ATTENTION[n]}.weight",),)) for n in names]
    if config.sparse_attention:
        entries += [Entry(f"{ours}.attn.indexer.{n}", ((f"{hf}.self_attn.indexer.{_INDEXER[n]}",),)) for n in _INDEXER]
    return entries


def _block_entries(config: ModelConfig, ours: str, hf: str, layer_index: int) -> list[Entry]:
    entries = _attention_entries(config, ours, hf)
    entries += [
        Entry(f"{ours}.attn_norm.weight", ((f"{hf}.input_layernorm.weight",),)),
        Entry(f"{ours}.mlp_norm.weight", ((f"{hf}.post_attention_layernorm.weight",),)),
    ]
    if not config.is_moe_layer(layer_index):
        return entries + _mlp_entries(f"{ours}.mlp", f"{hf}.mlp")
    experts = range(config.n_routed_experts)
    entries += [
        Entry(f"{ours}.mlp.router.weight", ((f"{hf}.mlp.gate.weight",),)),
        Entry(f"{ours}.mlp.router.expert_bias", ((f"{hf}.mlp.gate.e_score_correction_bias",),)),
        Entry(
            f"{ours}.mlp.experts.gate_up",
            tuple((f"{hf}.mlp.experts.{e}.gate_proj.weight", f"{hf}.mlp.experts.{e}.up_proj.weight") for e in experts),
            True,
        ),
        Entry(f"{ours}.mlp.experts.down", tuple((f"{hf}.mlp.experts.{e}.down_proj.weight",) for e in experts), True),
    ]
    if config.n_shared_experts:
        entries += _mlp_entries(f"{ours}.mlp.shared", f"{hf}.mlp.shared_experts")
    return entries


def checkpoint_entries(config: ModelConfig) -> list[Entry]:
    if config.attention_type == "v4":
        return v4_entries(config)
    entries = [
        Entry("embed.weight", (("model.embed_tokens.weight",),)),
        Entry("norm.weight", (("model.norm.weight",),)),
        Entry("head.weight", (("model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight",),)),
    ]
    for i in range(config.num_hidden_layers):
        entries += _block_entries(config, f"layers.{i}", f"model.layers.{i}", i)
    for k in range(config.num_nextn_predict_layers):
        index = config.num_hidden_layers + k
        hf = f"model.layers.{index}"
        entries += [Entry(f"mtp.{k}.{n}.weight", ((f"{hf}.{n}.weight",),)) for n in ("enorm", "hnorm", "eh_proj")]
        entries += [Entry(f"mtp.{k}.norm.weight", ((f"{hf}.shared_head.norm.weight",),))]
        entries += _block_entries(config, f"mtp.{k}.block", hf, index)
    return entries


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
    found = 0
    while found < config.num_nextn_predict_layers:
        key = (
            mtp_key(found)
            if config.attention_type == "v4"
            else f"model.layers.{config.num_hidden_layers + found}.eh_proj.weight"
        )
        if key not in source:
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
    if config.attention_type == "v4":
        source.rename(release_aliases(source.location))
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
    """Tensors a checkpoint may carry that we ignore: MTP copies of the shared embedding/head, MTP layers beyond
    the ones the config asks for, and RoPE tables some exporters store."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    if config.attention_type == "v4":  # MTP layers beyond the ones the config asks for
        parts = key.split(".")
        return key.startswith("model.mtp.") and int(parts[2]) >= config.num_nextn_predict_layers
    parts = key.split(".")
    if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= config.num_hidden_layers:
        return (
            ".embed_tokens." in key
            or ".shared_head.head." in key
            or int(parts[2]) >= config.num_hidden_layers + config.num_nextn_predict_layers
        )
    return False


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
    v3_mtp_layers = 0 if config.attention_type == "v4" else config.num_nextn_predict_layers
    for k in range(v3_mtp_layers):  # DeepSeek-V3's layout repeats the shared tensors per MTP layer (V4's does not)
        hf = f"model.layers.{config.num_hidden_layers + k}"
        out[f"{hf}.embed_tokens.weight"] = ours["embed.weight"].detach().clone()
        out[f"{hf}.shared_head.head.weight"] = ours["head.weight"].detach().clone()
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
