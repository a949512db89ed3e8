"""DeepSeek-V3.2's lightning indexer (DeepSeek Sparse Attention): which earlier tokens each query attends to.

    q_h   = W_qb c_Q                 per indexer head h (index_head_dim), from MLA's normalized compressed query
    k     = LayerNorm(W_k x)         one key per token, shared by the heads
    RoPE on the leading qk_rope_head_dim dims of q_h and k (half-split pairs)
    w_h   = W_w x / sqrt(H)          per-token head weights
    I(t, s) = Σ_h w_h(t) · ReLU(q_h(t) · k(s) / sqrt(index_head_dim))        in fp32

Attention then runs over the index_topk highest-scoring visible tokens of each query. The scores pick tokens, they
weight nothing: no gradient reaches the main model through them (the indexer is trained by its own KL loss).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.rope import apply_rope_half_split


class LightningIndexer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = config.index_n_heads, config.index_head_dim, config.rope_dim
        self.topk = config.index_topk
        self.q_up = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.head_weights = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def _rotated(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rope, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope_half_split(rope, cos, sin), rest], dim=-1)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim], q_latent [B, T, q_lora_rank] (normalized c_Q) → I [B, T, T] in fp32 (every pair: the
        caller masks what a query may not see)."""
        B, T, _ = x.shape
        q = self.q_up(q_latent).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q = self._rotated(q, cos, sin).transpose(1, 2)  # [B, T, H, D]
        k = self._rotated(self.k_norm(self.k_proj(x)).unsqueeze(1), cos, sin)  # [B, 1, T, D]
        dots = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.head_dim ** -0.5  # [B, T, H, T]
        weights = self.head_weights(x).float() * self.n_heads ** -0.5  # [B, T, H]
        return torch.matmul(weights.unsqueeze(-2), dots.relu()).squeeze(-2)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               visible: torch.Tensor) -> torch.Tensor:
        """visible [B, 1, T, T] (True = may attend) → the same mask keeping only each query's top-k tokens."""
        scores = self.scores(x, q_latent, cos, sin).masked_fill(~visible[:, 0], float("-inf"))
        chosen = scores.topk(min(self.topk, scores.shape[-1]), dim=-1).indices
        return visible & torch.zeros_like(visible[:, 0]).scatter_(-1, chosen, True)[:, None]
