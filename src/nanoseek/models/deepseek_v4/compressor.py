"""DeepSeek-V4's KV compression: every `rate` tokens become one entry that attention reads beside its window.

    C = W_kv x,  Z = W_z x + B           per token; B a learned bias per position in the window
    entry_w = RMSNorm(Σ_j softmax_j(Z) ⊙ C_j)   softmax over the window's tokens, per channel, in fp32
    RoPE at position w·rate (the window's first token), trailing dims

HCA (heavily compressed, rate 128): windows [w·m, (w+1)·m). CSA (rate 4) pools two series over overlapping windows:
each token projects to 2·d channels, [Ca; Cb]; entry w pools window w's Cb with window w-1's Ca (width 2m, stride
m; window 0 has no predecessor, its Ca slots weigh 0). An entry exists once its window closed: query t sees entry w
iff w < (t + 1) // rate.

CSA's lightning indexer (`CompressedIndexer`) pools its own, narrower keys the same way and picks, per query, the
index_topk entries its scores rank highest among those it may see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.models.common.layers import KeepsDtype, RMSNorm
from nanoseek.models.common.rope import apply_rope_trailing
from nanoseek.models.deepseek_v32.indexer import head_weights, index_scores, indexer_kl


@dataclass
class CompressorState:
    """What a compressor carries from one chunk of a sequence to the next (batch rows at the same position): the
    open window's projected values and gates, the last closed window's first series (CSA's overlap), and every
    entry so far. transformers' DeepseekV4HCACache / DeepseekV4CSACache hold the same."""

    pending: tuple[torch.Tensor, torch.Tensor]  # kv, gate [B, tokens since the last closed window, width]
    previous: tuple[torch.Tensor, torch.Tensor] | None  # CSA: kv, gate (with bias) [B, rate, head_dim]
    entries: torch.Tensor  # [B, N, head_dim]


class Compressor(KeepsDtype, nn.Module):
    kept_dtype = ("position_bias",)  # DeepSeek's `ape`: fp32 in its release, through every cast

    def __init__(self, dim: int, head_dim: int, rate: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.rate, self.overlap = head_dim, rate, overlap
        width = 2 * head_dim if overlap else head_dim
        self.kv_proj = nn.Linear(dim, width, bias=False)
        self.gate_proj = nn.Linear(dim, width, bias=False)
        self.position_bias = nn.Parameter(torch.empty(rate, width))
        self.kv_norm = RMSNorm(head_dim, eps)

    def pool(
        self, kv: torch.Tensor, gate: torch.Tensor, previous: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """kv, gate [B, N, rate, width] of N closed windows (gate with the position bias) → pooled [B, N, head_dim].
        CSA: `previous` is the Ca half (kv, gate [B, rate, head_dim]) of the window before the first, if any."""
        if self.overlap:
            d = self.head_dim
            if previous is None:  # no window before: zero values that the softmax weighs 0
                previous = (kv.new_zeros(kv[:, :1, :, :d].shape), gate.new_full(gate[:, :1, :, :d].shape, -torch.inf))
            else:
                previous = (previous[0].unsqueeze(1).to(kv.dtype), previous[1].unsqueeze(1).to(gate.dtype))
            kv = torch.cat([torch.cat([previous[0], kv[:, :-1, :, :d]], dim=1), kv[..., d:]], dim=2)
            gate = torch.cat([torch.cat([previous[1], gate[:, :-1, :, :d]], dim=1), gate[..., d:]], dim=2)
        weights = gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)
        return (kv * weights).sum(dim=2)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, dim] → kv, gate [B, T, width] (the gate without its position bias)."""
        return self.kv_proj(x), self.gate_proj(x)

    def empty(self, x: torch.Tensor) -> CompressorState:
        """The state before a sequence's first token, for x's batch rows."""
        width = self.kv_proj.out_features
        return CompressorState(
            (x.new_zeros(x.shape[0], 0, width),) * 2, None, x.new_zeros(x.shape[0], 0, self.head_dim)
        )

    def forward(self, x: torch.Tensor, rope: nn.Module, state: CompressorState | None = None) -> torch.Tensor:
        """x [B, T, dim], the tokens after `state` (None: a sequence's first) → every entry so far [B, N, head_dim],
        the ones of windows that closed now appended (and `state` advanced). rope: the compress RoPE, applied at
        each new entry's window start."""
        state = state or self.empty(x)
        kv, gate = (torch.cat([held, new], dim=1) for held, new in zip(state.pending, self.project(x)))
        B, n = x.shape[0], kv.shape[1] // self.rate
        closed = n * self.rate
        state.pending = kv[:, closed:], gate[:, closed:]
        if n == 0:
            return state.entries
        kv = kv[:, :closed].view(B, n, self.rate, -1)
        gate = gate[:, :closed].view(B, n, self.rate, -1) + self.position_bias
        pooled = self.kv_norm(self.pool(kv, gate, state.previous))
        if self.overlap:
            state.previous = kv[:, -1, :, : self.head_dim], gate[:, -1, :, : self.head_dim]
        first = state.entries.shape[1]
        cos, sin = rope(torch.arange(first, first + n, device=x.device) * self.rate)
        state.entries = torch.cat([state.entries, apply_rope_trailing(pooled.unsqueeze(1), cos, sin).squeeze(1)], 1)
        return state.entries


def entries_visible(positions: torch.Tensor, n_entries: int, rate: int) -> torch.Tensor:
    """positions [..., T] → [..., T, n_entries] bool: which closed windows each query may read."""
    return torch.arange(n_entries, device=positions.device) < ((positions + 1) // rate).unsqueeze(-1)


class CompressedIndexer(nn.Module):
    """CSA's lightning indexer: I(t, w) = Σ_h w_h(t) · ReLU(q_h(t) · k_w / sqrt(d)) over compressed keys k_w, in fp32
    (the V3.2 indexer's score over entries instead of tokens). q_h from attention's compressed query. It learns as
    V3.2's does (train/dsa.py): by KL to its layer's attention over the entries, from inputs cut off the model's
    graph, in the DSA stage a forward's ForwardTerms names."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.compressor = Compressor(
            config.hidden_size, self.head_dim, config.compress_rate_csa, True, config.rms_norm_eps
        )
        self.q_up = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.head_weights = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def queries(self, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """q_latent [B, T, q_lora_rank] → rotated queries [B, T, H, D]."""
        B, T, _ = q_latent.shape
        q = self.q_up(q_latent).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        return apply_rope_trailing(q, cos, sin).transpose(1, 2)

    def select(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """scores, visible [B, T, N] → the visible entries among each query's top index_topk, as a mask."""
        scores = scores.masked_fill(~visible, -torch.inf)
        chosen = scores.topk(min(self.topk, scores.shape[-1]), dim=-1).indices
        return visible & torch.zeros_like(visible).scatter_(-1, chosen, True)

    def forward(
        self,
        x: torch.Tensor,
        q_latent: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        compress_rope: nn.Module,
        state: CompressorState | None = None,
    ) -> torch.Tensor:
        """x [B, T, dim] after `state` → I [B, T, N] against every entry so far (`select` keeps what a query
        reads). rope: cos/sin at the tokens' positions."""
        keys = self.compressor(x, compress_rope, state)
        return index_scores(self.queries(q_latent, *rope), head_weights(self.head_weights, x), keys)

    def kl(self, attention: torch.Tensor, scores: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """DSA's KL from attention's probabilities over the entries [B, H, T, N] (summed over heads, L1-normalized
        over the attended ones) to softmax(I), over the queries that attend to any entry."""
        rows = attended.any(dim=-1)
        target = attention.detach().float().sum(dim=1).masked_fill(~attended, 0)[rows]
        return indexer_kl(target / target.sum(dim=-1, keepdim=True), scores[rows], attended[rows])
