"""How a run computes: autocast dtype, FP8 GEMMs, recomputation and compilation, applied to a freshly built
model."""

from __future__ import annotations

import torch

from nanoseek.fp8.convert import convert_to_fp8
from nanoseek.fp8.linear import Fp8Recipe
from nanoseek.models.common.eager import disable_marked
from nanoseek.models.deepseek_v3.attention import MultiHeadLatentAttention
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.train.config import TrainConfig


def autocast(device: torch.device, cfg: TrainConfig) -> torch.autocast:
    dtype = cfg.compute_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def use_tf32(enabled: bool) -> None:
    """fp32 matmuls and convolutions on CUDA in TensorFloat-32 (10-bit mantissa inputs, fp32 accumulation): several
    times faster on tensor cores, for the GEMMs a bf16 autocast leaves in fp32 (the router, the hyper-connections'
    mixing) or a whole fp32 run. Off by default: fp32 means fp32. No effect on CPUs."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_precision(model: DeepseekV3Model, cfg: TrainConfig) -> None:
    """Before parallelizing: FP8 GEMMs where V3 uses them, MLA's recomputation, and compiled blocks."""
    if cfg.precision == "fp8":
        convert_to_fp8(model, Fp8Recipe(pow2_scales=cfg.fp8_pow2_scales, backend=cfg.fp8_backend))
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.recompute = cfg.recompute
    if cfg.compile:
        compile_blocks(model)


def compile_blocks(model: DeepseekV3Model) -> None:
    """torch.compile each block's forward (the MTP modules' too). The module stays the same object, so parameter
    names, state dicts and checkpoints do not change, and FSDP's hooks, which wrap forward, stay eager. The routed
    experts' grouped GEMM and the expert-parallel all-to-all run eager inside the compiled graphs
    (models/common/eager.py: there is no compiled fp32 grouped GEMM on CPUs, and the all-to-all needs its split
    sizes on the host). Shapes are static: the MTP block sees one position fewer than the main blocks, and the
    dynamic-shape recompilation that would trigger fails in torch 2.13's inductor on CPU."""
    disable_marked()
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        block.forward = torch.compile(block.forward, dynamic=False)
