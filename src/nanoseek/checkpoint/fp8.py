"""DeepSeek's released quantized weight formats, as config.json announces them and the files store them.

    V3, V3.1, V3.2   E4M3 projections + fp32 `weight_scale_inv` per 128×128 block
                     quantization_config {quant_method fp8, fmt e4m3, activation_scheme dynamic, weight_block_size}
    V4-Flash / Pro   E4M3 linears + `scale` (ue8m0: a power of two) per 128×128 block; routed experts FP4 (int8,
                     two E2M1 values a byte, a ue8m0 scale per 32 along K) or, with expert_dtype fp8 (Flash-Base),
                     E4M3 as the linears; quantization_config adds scale_fmt ue8m0, `expert_dtype` sits beside it

Dequantized weight = stored value · scale in every case. `read_quantization` refuses, naming the field, any other
quantization_config: nanoseek would otherwise read its integers as something they are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from nanoseek.config import ModelConfig
from nanoseek.errors import CheckpointError
from nanoseek.fp8.fp4 import E8M0, FP4_GROUP, quantize_fp4
from nanoseek.fp8.quant import TILE, quantize_blocks
from nanoseek.models.deepseek_v4.checkpoint import to_release_names

FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
V4_QUANTIZATION_CONFIG = {**FP8_QUANTIZATION_CONFIG, "scale_fmt": "ue8m0"}


@dataclass(frozen=True)
class Quantization:
    """What a checkpoint's config.json says its weights are: block scales fp32 (V3) or ue8m0 (V4), and the routed
    experts' encoding."""

    scale_fmt: str = "float"
    expert_dtype: str = "fp8"


_ACCEPTED = {
    "quant_method": ("fp8",),
    "fmt": ("e4m3",),
    "activation_scheme": ("dynamic",),
    "scale_fmt": ("float", "ue8m0"),
    "expert_dtype": ("fp8", "fp4"),
}


def read_quantization(raw: dict[str, Any]) -> Quantization | None:
    """config.json's quantization_config (and V4's top-level expert_dtype) → Quantization, None for unquantized
    weights; any setting nanoseek does not implement → CheckpointError naming it."""
    spec = raw.get("quantization_config")
    if spec is None:
        if "expert_dtype" in raw and raw["expert_dtype"] not in ("bf16", None):
            raise CheckpointError(
                f"config field 'expert_dtype' is {raw['expert_dtype']!r} without a quantization_config"
            )
        return None
    if not isinstance(spec, dict):
        raise CheckpointError(f"config field 'quantization_config' must be an object, got {spec!r}")
    spec = {"expert_dtype": raw.get("expert_dtype", "fp8"), **spec}  # V4.1 moves expert_dtype inside
    for field, value in spec.items():
        if field == "weight_block_size":
            if value != [128, 128]:
                raise CheckpointError(
                    f"config field 'quantization_config.weight_block_size' is {value!r}; nanoseek reads 128x128 blocks"
                )
        elif field in _ACCEPTED and value not in _ACCEPTED[field]:
            raise CheckpointError(
                f"config field 'quantization_config.{field}' is {value!r}; nanoseek reads "
                + " or ".join(repr(v) for v in _ACCEPTED[field])
            )
        elif field not in _ACCEPTED and field not in ("modules_to_not_convert", "ignored_layers"):
            raise CheckpointError(f"config field 'quantization_config.{field}' is not one nanoseek implements")
    return Quantization(spec.get("scale_fmt", "float"), spec["expert_dtype"])


# ---- V3's layout (writing) ----------------------------------------------------------------------------------------
def is_fp8_weight(key: str, tensor: torch.Tensor) -> bool:
    """The block projections, and V3.2's indexer query/key projections (its head weights stay in high precision,
    as in DeepSeek's release)."""
    whole_blocks = tensor.dim() == 2 and tensor.shape[0] % 128 == 0 and tensor.shape[1] % 128 == 0
    projection = key.endswith(("_proj.weight", "indexer.wq_b.weight", "indexer.wk.weight"))
    return whole_blocks and projection and not key.endswith(("eh_proj.weight", "indexer.weights_proj.weight"))


def quantize_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek-V3's released layout: the projections inside the blocks (attention, dense MLPs, shared and routed
    experts) as E4M3 with a `weight_scale_inv` per 128×128 block; embeddings, head, router, norms and the MTP
    `eh_proj` unchanged. Only weights made of whole blocks are quantized: transformers (5.x) dequantizes on CPUs
    only those (nanoseek's loader reads ragged edge blocks too), so at V3's shape every projection but
    kv_a_proj_with_mqa (576 rows) is FP8."""
    out = {}
    for key, tensor in tensors.items():
        if is_fp8_weight(key, tensor):
            out[key], out[key.removesuffix(".weight") + ".weight_scale_inv"] = quantize_blocks(tensor)
        else:
            out[key] = tensor
    return out


# ---- V4's layout (writing) ----------------------------------------------------------------------------------------
# DeepSeek's V4 release: these linears in E4M3 (the compressors, the indexer's weights_proj, the router stay BF16)
_V4_FP8 = (
    ".attn.wq_a.weight",
    ".attn.wq_b.weight",
    ".attn.wkv.weight",
    ".attn.wo_a.weight",
    ".attn.wo_b.weight",
    ".attn.indexer.wq_b.weight",
    ".shared_experts.w1.weight",
    ".shared_experts.w2.weight",
    ".shared_experts.w3.weight",
    ".e_proj.weight",
    ".h_proj.weight",
)


def v4_released_encoding(key: str, shape: tuple[int, ...], expert_dtype: str) -> str | None:
    """How DeepSeek's V4 release stores tensor `key` (its release name): "fp8", "fp4" or None (as it is). Only
    whole 128×128 blocks (and FP4 groups of 32) are quantized: transformers dequantizes nothing else on CPUs."""
    if len(shape) != 2:
        return None
    if ".ffn.experts." in key:
        if expert_dtype == "fp4":
            return "fp4" if shape[1] % 32 == 0 else None
        return "fp8" if shape[0] % 128 == 0 and shape[1] % 128 == 0 else None
    return "fp8" if key.endswith(_V4_FP8) and shape[0] % 128 == 0 and shape[1] % 128 == 0 else None


def quantize_v4_release(tensors: dict[str, torch.Tensor], expert_dtype: str = "fp4") -> dict[str, torch.Tensor]:
    """Tensors under DeepSeek's V4 release names → as the release stores them: `X.weight` E4M3 (or FP4 experts)
    with `X.scale` in ue8m0; every other tensor as given."""
    out = {}
    for key, tensor in tensors.items():
        encoding = v4_released_encoding(key, tuple(tensor.shape), expert_dtype)
        scale_key = key.removesuffix(".weight") + ".scale"
        if encoding == "fp4":
            out[key], out[scale_key] = quantize_fp4(tensor)
        elif encoding == "fp8":
            out[key], scale = quantize_blocks(tensor, pow2=True)
            out[scale_key] = scale.to(E8M0)
        else:
            out[key] = tensor.int() if key.endswith(".tid2eid") else tensor  # the hash table: I32 as released
    return out


def _v3_release(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    return quantize_state_dict(tensors), {**config.to_hf_dict(), "quantization_config": FP8_QUANTIZATION_CONFIG}


def _v4_release(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """V4-Flash's own layout: DeepSeek's names and config form, FP8 linears and FP4 experts with ue8m0 scales."""
    released = {**config.to_hf_dict("deepseek"), "quantization_config": V4_QUANTIZATION_CONFIG, "expert_dtype": "fp4"}
    return quantize_v4_release(to_release_names(tensors)), released


# config.architecture → how DeepSeek released that generation quantized (V3's form for the others)
_RELEASE_FORMS = {"deepseek_v4": _v4_release}


def quantized_release(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """A model's tensors (under to_hf_state_dict's names) → the files and config.json of DeepSeek's quantized
    release of its generation."""
    return _RELEASE_FORMS.get(config.architecture, _v3_release)(config, tensors)


def _stored_bytes(shape: tuple[int, ...], encoding: str | None, scale_bytes: int, element_size: int) -> int:
    """Bytes of one file tensor of (dequantized) shape [..., R, K] as released: values and scales."""
    if encoding is None:
        return math.prod(shape) * element_size
    *lead, rows, cols = shape
    if encoding == "fp4":
        return math.prod(lead) * rows * (cols // 2 + scale_bytes * (cols // FP4_GROUP))
    return math.prod(lead) * (rows * cols + scale_bytes * -(-rows // TILE) * -(-cols // TILE))


def _v3_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(
        _stored_bytes(tuple(t.shape), "fp8" if is_fp8_weight(k, t) else None, 4, t.element_size())
        for k, t in tensors.items()
    )


def _v4_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(
        _stored_bytes(tuple(t.shape), v4_released_encoding(k, tuple(t.shape), "fp4"), 1, t.element_size())
        for k, t in to_release_names(tensors).items()
    )


_RELEASED_BYTES = {"deepseek_v4": _v4_bytes}


def released_bytes(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> int:
    """What `quantized_release` would write, in bytes, counted from the shapes alone (meta tensors will do): the
    weights a model of `config` keeps resident when loaded from DeepSeek's release with quantized=True."""
    return _RELEASED_BYTES.get(config.architecture, _v3_bytes)(tensors)
