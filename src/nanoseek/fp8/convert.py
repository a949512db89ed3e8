"""Which GEMMs run in FP8 (DeepSeek-V3 §3.3.1): the attention projections, the dense and shared-expert MLPs, the
routed experts and the MTP projections (V3's eh_proj, V4's e_proj and h_proj, FP8 in DeepSeek's V4 release too).
The embedding, the output head, the router, every norm and the attention
core (softmax(q·kᵀ)·v) keep the training precision; so do V4's compressors and indexers, its grouped output
projection and hyper-connections (DeepSeek ships the first in BF16; the others are not plain linears)."""

from __future__ import annotations

from torch import nn

from nanoseek.fp8.linear import Fp8Linear, Fp8Recipe, grouped_gemm_for
from nanoseek.models.common.layers import MLP
from nanoseek.models.common.moe import RoutedExperts
from nanoseek.models.deepseek_v3.attention import MultiHeadLatentAttention
from nanoseek.models.deepseek_v3.model import DeepseekV3Model, MTPModule
from nanoseek.models.deepseek_v4.attention import HybridAttention
from nanoseek.models.deepseek_v4.hyper import HyperMTP
from nanoseek.models.llama.attention import GroupedQueryAttention


def convert_to_fp8(model: DeepseekV3Model, recipe: Fp8Recipe) -> list[str]:
    """Swaps those layers' GEMMs for FP8 ones in place (parameters and their names stay); returns the names of the
    converted modules. Call before parallelizing: expert parallelism takes the experts' GEMM from them."""
    converted = []
    for name, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            module.gemm = grouped_gemm_for(recipe)
            converted.append(name)
        if not isinstance(
            module, (MultiHeadLatentAttention, GroupedQueryAttention, HybridAttention, MLP, MTPModule, HyperMTP)
        ):
            continue
        for child_name, child in module.named_children():
            if type(child) is nn.Linear:
                setattr(module, child_name, Fp8Linear.from_linear(child, recipe))
                converted.append(f"{name}.{child_name}")
    return converted
