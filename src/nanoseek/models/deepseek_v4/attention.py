"""DeepSeek-V4's attention: one shared key/value head over a sliding window of raw tokens, plus compressed entries.

    c_Q = RMSNorm(W_qa x);  q_h = RMSNorm(W_qb c_Q)_h      per head, the second norm unweighted
    kv  = RMSNorm(W_kv x)                                   one head of head_dim: the key and the value
    RoPE on the trailing qk_rope_head_dim dims of q and kv (interleaved pairs)
    keys = [the last sliding_window tokens; compressed entries (HCA: all closed, CSA: the indexer's top-k)]
    o_h  = softmax([q_h·keys / sqrt(d), sink_h])[:-1] · keys    a learned sink logit per head takes some weight
    RoPE by minus the query's position on o_h's rotated dims: each key's contribution depends on distance only
    out  = W_ob · [W_oa,g · (heads of group g)]_g            grouped output projection (o_groups blocks)

The window keeps per-token cost flat; the entries carry everything older at 1/4 (CSA) or 1/128 (HCA) the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.models.common.layers import KeepsDtype, RMSNorm, dense
from nanoseek.models.common.rope import apply_rope_trailing
from nanoseek.models.common.terms import ForwardTerms
from nanoseek.models.deepseek_v4.compressor import CompressedIndexer, Compressor, CompressorState, entries_visible
from nanoseek.models.deepseek_v4.config import CSA, SLIDING

Rope = tuple[torch.Tensor, torch.Tensor]


def window_visible(positions: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
    """[T] query and [S] key positions → [T, S] bool: causal, and at most `window` tokens back counting the query
    itself."""
    distance = positions.unsqueeze(-1) - key_positions
    return (distance >= 0) & (distance < window)


@dataclass
class AttentionCache:
    """A layer's state between chunks of a sequence (batch rows at the same position): the keys of the last
    sliding_window - 1 tokens, and the compressors' (CSA: the indexer's too). Bounded but for the entries."""

    keys: torch.Tensor  # [B, <= window - 1, head_dim]
    key_positions: torch.Tensor  # [<= window - 1]
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None


class HybridAttention(KeepsDtype, nn.Module):
    kept_dtype = ("sinks",)  # fp32 in DeepSeek's release, through every cast
    # parameters a quantized checkpoint may replace by a weight kept as released (checkpoint/resident.py): anything
    # with `dequantize(dtype)`
    stored_weights = ("out_down",)

    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.n_heads, self.window, self.layer_type = heads, config.sliding_window, layer_type
        self.o_groups = config.o_groups
        self.q_down = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
        self.q_up = nn.Linear(config.q_lora_rank, heads * self.head_dim, bias=False)
        self.q_head_eps = config.rms_norm_eps
        self.kv_proj = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.kv_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        # group g's heads [heads·head_dim / o_groups] → o_lora_rank rows of its own block
        self.out_down = nn.Parameter(
            torch.empty(config.o_groups * config.o_lora_rank, heads * self.head_dim // config.o_groups)
        )
        self.out_proj = nn.Linear(config.o_groups * config.o_lora_rank, config.hidden_size, bias=False)
        self.sinks = nn.Parameter(torch.empty(heads))
        self.compressor: Compressor | None = None
        self.indexer: CompressedIndexer | None = None
        if layer_type != SLIDING:
            csa = layer_type == CSA
            self.rate = config.compress_rate_csa if csa else config.compress_rate_hca
            self.compressor = Compressor(config.hidden_size, self.head_dim, self.rate, csa, config.rms_norm_eps)
            self.indexer = CompressedIndexer(config) if csa else None

    @property
    def rope_kind(self) -> str:
        """Which of V4's two RoPEs this layer uses: "main" (sliding only) or "compress"."""
        return "main" if self.compressor is None else "compress"

    def queries(self, x: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, dim] → q [B, H, T, D] (rotated) and c_Q [B, T, q_lora_rank] (the indexer's input too)."""
        B, T, _ = x.shape
        q_latent = self.q_norm(self.q_down(x))
        q = self.q_up(q_latent).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (self.head_dim,), eps=self.q_head_eps)
        return apply_rope_trailing(q, *rope), q_latent

    def key_values(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x [B, T, dim] → the rotated shared key/value [B, T, D]: what the window caches per token."""
        return apply_rope_trailing(self.kv_norm(self.kv_proj(x)).unsqueeze(1), *rope).squeeze(1)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, H, T, D], keys [B, S, D] (also the values), visible [B, 1 or H, T, S] → [B, H, T, D] and the
        probabilities [B, H, T, S]. The sink logit joins each softmax (in fp32) and is dropped after it: the rows
        need not sum to 1."""
        B, H, T, D = q.shape
        # the heads share the keys: one [B, H·T, D] × [B, D, S] product, never H copies of the keys
        logits = torch.bmm(q.reshape(B, H * T, D), keys.transpose(-1, -2)).view(B, H, T, -1) * self.head_dim**-0.5
        logits = logits.float().masked_fill(~visible, -torch.inf)
        sinks = self.sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        probs = torch.cat([logits, sinks], dim=-1).softmax(dim=-1)[..., :-1]
        return torch.bmm(probs.to(keys.dtype).flatten(1, 2), keys).view(B, H, T, D), probs

    def output(self, attended: torch.Tensor, rope: Rope) -> torch.Tensor:
        """attended [B, H, T, D] → [B, T, dim]: rotated back by the query's position, then the grouped projection."""
        cos, sin = rope
        o = apply_rope_trailing(attended, cos, -sin).transpose(1, 2)  # [B, T, H, D]
        B, T = o.shape[:2]
        grouped = o.reshape(B, T, self.o_groups, -1)
        # [G, o_lora_rank, H·D/G]
        blocks = dense(self.out_down, grouped.dtype).view(self.o_groups, -1, grouped.shape[-1])
        return self.out_proj(torch.einsum("btgi,goi->btgo", grouped, blocks.to(grouped.dtype)).flatten(2))

    def empty_cache(self, x: torch.Tensor) -> AttentionCache:
        """The cache before a sequence's first token, for x's batch rows."""
        return AttentionCache(
            x.new_zeros(x.shape[0], 0, self.head_dim),
            torch.zeros(0, dtype=torch.long, device=x.device),
            self.compressor.empty(x) if self.compressor else None,
            self.indexer.compressor.empty(x) if self.indexer else None,
        )

    def forward(
        self,
        x: torch.Tensor,
        ropes: dict[str, nn.Module],
        positions: torch.Tensor,
        cache: AttentionCache | None = None,
        terms: ForwardTerms | None = None,
    ) -> torch.Tensor:
        """x [B, T, dim] at positions [T] → [B, T, dim]. Without a cache, whole causal sequences (positions 0..T-1);
        with one, the tokens after it, which it then holds too. ropes: the "main" and "compress" RotaryEmbedding.
        While CSA's indexer learns (a DSA stage in `terms`, in training), its KL goes to terms (add_indexer_kl)."""
        rope = ropes[self.rope_kind](positions)
        q, q_latent = self.queries(x, rope)
        keys, key_positions = self.key_values(x, rope), positions
        if cache is not None:
            keys = torch.cat([cache.keys, keys], dim=1)
            key_positions = torch.cat([cache.key_positions, positions])
            cache.keys, cache.key_positions = keys[:, -(self.window - 1) :], key_positions[-(self.window - 1) :]
        visible = window_visible(positions, key_positions, self.window).expand(x.shape[0], 1, -1, -1)
        scores, n = None, 0
        if self.compressor is not None:
            entries = self.compressor(x, ropes["compress"], cache.compressor if cache else None)
            n = entries.shape[1]
            keys = torch.cat([keys, entries], dim=1)
            readable = entries_visible(positions, n, self.rate).expand(x.shape[0], -1, -1)
            if self.indexer is not None:
                stage, learning = (None, False) if terms is None else terms.indexer_stage(self.training)
                with torch.set_grad_enabled(learning):  # the indexer learns from its own loss only
                    scores = self.indexer(
                        x.detach(), q_latent.detach(), rope, ropes["compress"], cache.indexer if cache else None
                    )
                if stage != "warmup":  # the dense warm-up attends to every entry while the indexer learns
                    readable = self.indexer.select(scores.detach(), readable)
                scores = scores if learning else None
            visible = torch.cat([visible, readable.unsqueeze(1)], dim=-1)
        attended, probs = self.attend(q, keys, visible)
        if scores is not None and self.indexer is not None:
            kl = self.indexer.kl(probs[..., probs.shape[-1] - n :], scores, visible[:, 0, :, visible.shape[-1] - n :])
            terms.add_indexer_kl(kl)
        return self.output(attended, rope)
