"""The DeepSeek-V3.2 decoder: V3's (deepseek_v3/model.py) with DSA's attention in every layer, MTP included."""

from __future__ import annotations

from torch import nn

from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.deepseek_v32.attention import SparseLatentAttention


class DeepseekV32Model(DeepseekV3Model):
    architectures = ("deepseek_v32",)
    attention = SparseLatentAttention

    def indexers(self) -> list[nn.Module]:
        return [block.attn.indexer for block in [*self.layers, *(module.block for module in self.mtp)]]
