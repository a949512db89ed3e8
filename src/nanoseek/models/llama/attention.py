"""Grouped-query attention (Llama 3 style): the dense baseline's attention, for comparisons with MLA in the same code.

    q = W_Q h  → H heads of head_dim          k = W_K h, v = W_V h → G heads each (H/G query heads share one)
    out = W_O softmax(RoPE(q)·RoPE(k) / sqrt(head_dim)) v

Every dimension of a head is rotated. Its cache would hold 2·G·head_dim values per token and layer, against MLA's
kv_lora_rank + qk_rope_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.models.common.rope import apply_rope
from nanoseek.models.common.terms import ForwardTerms


class GroupedQueryAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        terms: ForwardTerms | None = None,
    ) -> torch.Tensor:
        """Causal self-attention over x [B, T, dim] (or under `mask` [B, 1, T, T], True = visible); it adds no
        auxiliary loss to `terms`."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
