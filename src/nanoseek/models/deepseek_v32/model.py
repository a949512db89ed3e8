"""The DeepSeek-V3.2 decoder: V3's (deepseek_v3/model.py) with DSA's attention in every layer, MTP included."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.deepseek_v32.attention import SparseLatentAttention


class DeepseekV32Model(DeepseekV3Model):
    architectures = ("deepseek_v32",)
    attention = SparseLatentAttention
    pipeline_refusal = "V3.2's indexer loss is not carried through pipeline stages: train it without --pp"

    @staticmethod
    def attention_core_flops(config: ModelConfig, visible: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """At most index_topk keys per query, and the indexer scoring every visible token (a dot per indexer head,
        then the weighted sum over heads)."""
        attended = visible.clamp(max=config.index_topk)
        indexer = 2 * config.index_n_heads * (config.index_head_dim + 1) * visible
        per_layer = 2 * config.num_attention_heads * (config.qk_head_dim + config.attention_v_dim) * attended + indexer
        return (layers or config.num_hidden_layers) * per_layer

    def indexers(self) -> list[nn.Module]:
        return [block.attn.indexer for block in [*self.layers, *(module.block for module in self.mtp)]]
