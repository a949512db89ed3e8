"""How a run computes: autocast dtype, FP8 GEMMs and recomputation, applied to a freshly built model."""

from __future__ import annotations

import torch

from nanoseek.fp8.convert import convert_to_fp8
from nanoseek.fp8.linear import Fp8Recipe
from nanoseek.model.attention import MultiHeadLatentAttention
from nanoseek.model.transformer import Transformer
from nanoseek.train.config import TrainConfig


def autocast(device: torch.device, cfg: TrainConfig) -> torch.autocast:
    dtype = cfg.compute_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def apply_precision(model: Transformer, cfg: TrainConfig) -> None:
    """Before parallelizing: FP8 GEMMs where V3 uses them, and MLA's recomputation."""
    if cfg.precision == "fp8":
        convert_to_fp8(model, Fp8Recipe(pow2_scales=cfg.fp8_pow2_scales, backend=cfg.fp8_backend))
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.recompute = cfg.recompute
