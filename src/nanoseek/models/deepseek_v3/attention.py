"""Multi-head Latent Attention (DeepSeek-V2 §2.1): keys and values come from one small latent per token.

    c_Q  = RMSNorm(W_DQ h)                      (q_lora_rank; or no compression: q = W_Q h)
    q    = W_UQ c_Q → per head [q_nope (qk_nope_head_dim); q_rope (qk_rope_head_dim)], RoPE on q_rope
    c_KV = RMSNorm(W_DKV h)                     (kv_lora_rank, the only per-token state besides k_rope)
    k_rope = RoPE(W_KR h)                       (one key shared by all heads)
    [k_nope; v] = W_UKV c_KV per head
    out  = W_O softmax([q_nope; q_rope]·[k_nope; k_rope] · scale) v

Decoding absorbs the up-projection (DeepSeek-V2 §2.1.2): q_nope·k_nope = (W_UKᵀ q_nope)·c_KV, and W_UV moves past
the attention weights, so attention runs directly over the cached latents and nothing per head is ever cached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.config import ModelConfig
from nanoseek.models.common.layers import RMSNorm, dense
from nanoseek.models.common.paged import PagedBatch, PagedStore, PrefillChunk
from nanoseek.models.common.rope import apply_rope
from nanoseek.models.common.terms import ForwardTerms


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.latent_dim = config.v_head_dim, config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        qk_dim, dim = config.qk_head_dim, config.hidden_size
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, self.n_heads * qk_dim, bias=False)
        else:
            self.q_down = nn.Linear(dim, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_up = nn.Linear(config.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_down = nn.Linear(dim, self.latent_dim + self.rope_dim, bias=False)  # → [c_KV; k_rope]
        self.kv_norm = RMSNorm(self.latent_dim, config.rms_norm_eps)
        self.kv_up = nn.Linear(self.latent_dim, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.out_proj = nn.Linear(self.n_heads * self.v_dim, dim, bias=False)
        self.recompute = False  # set by the trainer: replay attend_latents in backward

    def compress(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The down-projections: x [B, T, dim] → query input (c_Q before its norm, or x itself without query
        compression), [c_KV; k_rope] before the norm and RoPE."""
        return (self.q_down(x) if hasattr(self, "q_down") else x), self.kv_down(x)

    def queries(self, q_input: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ q_nope [B, H, T, nope], q_rope [B, H, T, rope] (rotated)."""
        B, T, _ = q_input.shape
        q = self.q_up(self.q_norm(q_input)) if hasattr(self, "q_up") else self.q_proj(q_input)
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def latents(
        self, kv_input: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ normalized latent c_KV [B, T, kv_lora_rank], rotated k_rope [B, T, rope]: all that MLA has to
        remember of a token."""
        latent, k_rope = kv_input.split([self.latent_dim, self.rope_dim], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin).squeeze(1)
        return self.kv_norm(latent), k_rope

    def keys_values(self, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Up-projection: latent [B, S, C], k_rope [B, S, rope] → per-head k [B, H, S, qk], v [B, H, S, v]."""
        B, S, _ = latent.shape
        kv = self.kv_up(latent).view(B, S, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        return torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, self.n_heads, S, self.rope_dim)], dim=-1), v

    def attend_latents(
        self,
        q_input: torch.Tensor,
        kv_input: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """From the compressed inputs: norms, up-projections to per-head q, k [B, H, T, qk] and v, then causal
        attention → [B, T, H·v]. `recompute` replays all of it in backward (V3 §3.3.4 recomputes the norms and
        up-projections; SDPA would keep its per-head q, k, v for backward, so the core is replayed with them), and
        only the compressed inputs stay in memory: the small per-token latents that are MLA's point."""
        B, T, _ = kv_input.shape
        q_nope, q_rope = self.queries(q_input, cos, sin)
        k, v = self.keys_values(*self.latents(kv_input, cos, sin))
        y = attend(torch.cat([q_nope, q_rope], dim=-1), k, v, self.softmax_scale, mask)
        return y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        terms: ForwardTerms | None = None,
    ) -> torch.Tensor:
        """Causal self-attention over a whole sequence (training): up-project the latents, then SDPA. `mask`
        [B, 1, T, T] (True = visible) replaces the causal mask, e.g. to keep packed documents apart."""
        q_input, kv_input = self.compress(x)
        mask = self.attention_mask(x, q_input, kv_input, cos, sin, mask, terms)
        if self.recompute and torch.is_grad_enabled():
            y = checkpoint(self.attend_latents, q_input, kv_input, cos, sin, mask, use_reentrant=False)
        else:
            y = self.attend_latents(q_input, kv_input, cos, sin, mask)
        return self.out_proj(y)

    def attention_mask(
        self,
        x: torch.Tensor,
        q_input: torch.Tensor,
        kv_input: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        terms: ForwardTerms | None,
    ) -> torch.Tensor | None:
        """The mask a training forward attends with: the one given (V3.2 narrows it to the indexer's picks, and
        adds the indexer's loss to `terms`)."""
        return mask

    def forward_paged(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, store: PagedStore, batch: PagedBatch
    ) -> torch.Tensor:
        """Inference over a paged store (models/common/paged.py): x [1, N, dim] holds the batch's new tokens. Their
        [c_KV; k_rope] go to their slots first; then decode rows attend in the absorbed form and each prefill chunk
        attends, up-projected, to its whole context (cached prefix plus itself)."""
        q_input, kv_input = self.compress(x)
        q_nope, q_rope = self.queries(q_input, cos, sin)  # [1, H, N, *]
        latent, k_rope = self.latents(kv_input, cos, sin)
        latents = store.latents
        latents.index_copy_(0, batch.slots, torch.cat([latent, k_rope], dim=-1)[0].to(latents.dtype))
        index = self.index_new_tokens(x, q_input, cos, sin, store, batch)
        parts = []
        if batch.decode_rows:
            decoded = slice(0, batch.decode_tokens)
            slots, visible = self.decode_slots(index, store, batch)
            parts.append(self._absorbed(q_nope[0, :, decoded], q_rope[0, :, decoded], gather(latents, slots), visible))
        q = torch.cat([q_nope, q_rope], dim=-1)
        for chunk in batch.prefills:
            context = gather(latents, chunk.context).to(q.dtype)[None]  # [1, ctx, C + R]
            k, v = self.keys_values(*context.split([self.latent_dim, self.rope_dim], dim=-1))
            queries = q[:, :, chunk.start : chunk.start + chunk.length]
            y = attend(queries, k, v, self.softmax_scale, self.prefill_mask(index, store, chunk))  # [1, H, T, v]
            parts.append(y[0].transpose(0, 1).reshape(chunk.length, self.n_heads * self.v_dim))
        return self.out_proj(torch.cat(parts)[None])

    def index_new_tokens(
        self,
        x: torch.Tensor,
        q_input: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        store: PagedStore,
        batch: PagedBatch,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What choosing among the cached tokens needs of the new ones (V3.2: the indexer's queries and weights,
        after writing their indexer keys to the store); V3 attends to every cached token and needs nothing."""
        return None

    def decode_slots(
        self, index: tuple[torch.Tensor, torch.Tensor] | None, store: PagedStore, batch: PagedBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The store slots each decode row attends to, and which of them each of its tokens may see: the row's
        whole context (V3.2: its top-k)."""
        return batch.decode_context, batch.decode_visible()

    def prefill_mask(
        self, index: tuple[torch.Tensor, torch.Tensor] | None, store: PagedStore, chunk: PrefillChunk
    ) -> torch.Tensor | None:
        """A prefill chunk's mask over its context: causal (None when the chunk is its whole context)."""
        return None if chunk.length == chunk.context.shape[0] else chunk.visible()

    def _absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, context: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """Decode tokens: q_nope [H, n, nope], q_rope [H, n, rope] over context [rows, S, C + R] with visible
        [rows, width, 1, S], n = rows·width (each sequence's tokens share its context; a selected context has one
        token per row) → [n, H·v]. The query moves into latent space (W_UKᵀ q_nope), so scores against
        [c_KV; k_rope] are one product, and the heads (and draft tokens) of a sequence fold into the rows of one
        GEMM per sequence, not one GEMV per head."""
        rows, width, heads = visible.shape[0], visible.shape[1], self.n_heads
        context = context.to(q_nope.dtype)
        w_up = dense(self.kv_up.weight, q_nope.dtype)
        w_uk, w_uv = w_up.view(heads, self.nope_dim + self.v_dim, self.latent_dim).split([self.nope_dim, self.v_dim], 1)
        q_latent = torch.einsum("hnd,hdc->nhc", q_nope, w_uk)  # [n, H, C]
        q_all = torch.cat([q_latent, q_rope.transpose(0, 1)], dim=-1).reshape(rows, width * heads, -1)
        scores = torch.bmm(q_all, context.transpose(1, 2)).float() * self.softmax_scale  # [rows, width·H, S]
        scores = scores.view(rows, width, heads, -1).masked_fill(~visible, float("-inf"))
        weights = scores.softmax(dim=-1).to(context.dtype).view(rows, width * heads, -1)
        out_latent = torch.bmm(weights, context[..., : self.latent_dim])  # [rows, width·H, C]
        out = torch.einsum("nhc,hvc->nhv", out_latent.view(rows * width, heads, -1), w_uv)
        return out.reshape(rows * width, heads * self.v_dim)


def gather(store: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """store [slots, width] rows at slots [...] → [..., width]. index_select copies whole rows (3x faster on a CPU
    than advanced indexing for a context's rows)."""
    return store.index_select(0, slots.flatten()).view(*slots.shape, store.shape[-1])


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal SDPA, or with `mask` [T, S] or [B, 1, T, S] (True = visible): queries that are the last T of S
    positions, or documents packed in one sequence. MLA's
    values are narrower than its queries/keys (128 vs 192 at V3 shape), which sends SDPA to its slow math backend on
    some devices (CPU among them); zero-padding v to the key width keeps the fused flash kernel (1.6x faster here),
    and the padded output columns are exactly zero and dropped."""
    pad = max(0, q.shape[-1] - v.shape[-1])
    y = F.scaled_dot_product_attention(
        q, k, F.pad(v, (0, pad)) if pad else v, attn_mask=mask, is_causal=mask is None, scale=scale
    )
    return y[..., : v.shape[-1]]
