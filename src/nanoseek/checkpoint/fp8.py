"""DeepSeek-V3's released FP8 weight format: E4M3 weights with one fp32 `weight_scale_inv` per 128×128 block
(dequantized weight = E4M3 value · weight_scale_inv), announced by config.json's `quantization_config`."""

from __future__ import annotations

import torch

from nanoseek.fp8.quant import quantize_blocks

FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


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
