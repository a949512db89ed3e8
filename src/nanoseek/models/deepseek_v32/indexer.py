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
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.models.common.layers import dense
from nanoseek.models.common.rope import apply_rope_half_split

SCORE_CHUNK_ELEMENTS = 1 << 24  # per-head products held at once while scoring (64 MiB in fp32)


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

    def queries(self, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q_latent [B, T, q_lora_rank] (MLA's normalized c_Q) → rotated per-head queries [B, T, H, D]."""
        B, T, _ = q_latent.shape
        q = self.q_up(q_latent).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        return self._rotated(q, cos, sin).transpose(1, 2)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim] → rotated keys [B, T, D]: what the paged store keeps per token beside MLA's latent."""
        return self._rotated(self.k_norm(self.k_proj(x)).unsqueeze(1), cos, sin).squeeze(1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        return head_weights(self.head_weights, x)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim], q_latent [B, T, q_lora_rank] → I [B, T, T] of a whole sequence (`top_k_mask` turns it
        into what each query attends to)."""
        return index_scores(self.queries(q_latent, cos, sin), self.weights(x), self.keys(x, cos, sin))


def head_weights(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x [B, T, dim] → per-token head weights w_h / sqrt(H) [B, T, H], computed in fp32 under any autocast (as
    transformers keeps weights_proj in fp32)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), dense(proj.weight, torch.float32).float()) * proj.out_features**-0.5


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [B, T, H, D], weights [B, T, H], keys [B, S, D] → I [B, T, S] in fp32, every pair (the caller masks what a
    query may not see). Queries go in chunks so that the per-head products [B, chunk, H, S] stay within
    SCORE_CHUNK_ELEMENTS (a 1,024-token prefill chunk at 128K context would otherwise hold 4 GiB)."""
    B, T, H, D = q.shape
    rows = max(1, SCORE_CHUNK_ELEMENTS // (B * H * max(1, keys.shape[1])))
    keys_t = keys.float().transpose(-1, -2)
    parts = []
    for start in range(0, T, rows):
        q_part, w_part = q[:, start : start + rows], weights[:, start : start + rows]
        n = q_part.shape[1]
        # one [n·H, D] @ [D, S] product per sequence (a [B, 1, D, S] key broadcast against [B, n, ...] would copy
        # the keys n times)
        dots = torch.bmm(q_part.float().reshape(B, n * H, D) * D**-0.5, keys_t).view(B, n, H, -1)
        parts.append(torch.matmul(w_part.unsqueeze(-2), dots.relu()).squeeze(-2))  # [B,n,1,H] @ [B,n,H,S]
    return torch.cat(parts, dim=1)


def indexer_kl(target: torch.Tensor, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """DSA's indexer loss: KL(p ‖ softmax(I)) over the tokens each query attends to (all it may see in the dense
    warm-up, its top-k in sparse training), averaged over queries. target p [B, T, S] (0 outside `allowed`),
    scores I [B, T, S], allowed [B, T, S] bool."""
    log_q = scores.masked_fill(~allowed, float("-inf")).log_softmax(dim=-1)
    terms = torch.where(allowed, torch.xlogy(target, target) - target * log_q, 0.0)
    return terms.sum(dim=-1).mean()


def top_k_mask(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """scores [..., T, S], visible [..., T, S] → visible restricted to each query's k highest-scoring tokens."""
    scores = scores.masked_fill(~visible, float("-inf"))
    chosen = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    return visible & torch.zeros_like(visible).scatter_(-1, chosen, True)
