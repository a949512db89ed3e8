"""DeepSeek-V4's manifold-constrained hyper-connections (mHC): the residual is hc_mult streams [B, T, n, dim].

Around each sub-block (attention, then MoE), weights computed from the streams themselves:

    m = W · RMSNorm(flatten(streams))                  one linear map to 2n + n² numbers per token
    pre  = sigmoid(s_pre · m_pre + b_pre) + ε          [n]: collapses the streams into the sub-block's input
    post = 2 · sigmoid(s_post · m_post + b_post)       [n]: spreads the sub-block's output over the streams
    comb = Sinkhorn(softmax(s_comb · m_comb + b_comb) + ε)   [n, n], doubly stochastic: mixes the streams
    streams' = post ⊗ output + combᵀ · streams

A doubly-stochastic mix neither grows nor shrinks the residual however many layers compose it. Everything here
runs in fp32 under any autocast, as DeepSeek and transformers keep it: the mix is the residual path itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.models.common.layers import KeepsDtype, RMSNorm
from nanoseek.models.common.moe import MoE
from nanoseek.models.common.paged import PagedBatch
from nanoseek.models.common.terms import ForwardTerms
from nanoseek.models.deepseek_v4.attention import AttentionCache, HybridAttention
from nanoseek.models.deepseek_v4.config import SLIDING
from nanoseek.models.deepseek_v4.paged import LayerStore, forward_segments


def _normed_mixes(streams: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """streams [B, T, n, dim] → W · RMSNorm(flattened streams) [B, T, out] in fp32 (an unweighted RMSNorm)."""
    flat = streams.flatten(-2).float()
    return F.linear(F.rms_norm(flat, (flat.shape[-1],), eps=eps), weight.float())


def _sinkhorn(comb: torch.Tensor, iterations: int, eps: torch.Tensor) -> torch.Tensor:
    """Sinkhorn-Knopp on comb [..., n, n]: rows, then columns, divided by their sums (+ eps), `iterations` times.
    Without autograd the divisions are in place into one buffer per direction: n is 4, so each op is a few
    numbers per token and the step is dispatch cost (2x fewer allocations: -35 % time at decode)."""
    if comb.requires_grad:
        for _ in range(iterations):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        return comb
    rows, columns = comb.new_empty(*comb.shape[:-1], 1), comb.new_empty(*comb.shape[:-2], 1, comb.shape[-1])
    for _ in range(iterations):
        torch.sum(comb, dim=-1, keepdim=True, out=rows).add_(eps)
        comb.div_(rows)
        torch.sum(comb, dim=-2, keepdim=True, out=columns).add_(eps)
        comb.div_(columns)
    return comb


class HyperConnection(KeepsDtype, nn.Module):
    kept_dtype = ("fn", "base", "scale")  # fp32 in DeepSeek's release, through every cast

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = self.n = config.hc_mult
        self.iterations, self.eps, self.norm_eps = config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * config.hidden_size))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [B, T, n, dim] → the sub-block's input [B, T, dim], post [B, T, n], comb [B, T, n, n] (fp32)."""
        n = self.n
        with torch.autocast(streams.device.type, enabled=False):
            mixes = _normed_mixes(streams, self.fn, self.norm_eps)
            pre_m, post_m, comb_m = mixes.split([n, n, n * n], dim=-1)
            pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
            scale = self.scale.float()
            pre = torch.sigmoid(pre_m * scale[0] + pre_b) + self.eps
            post = 2 * torch.sigmoid(post_m * scale[1] + post_b)
            eps = pre.new_tensor(self.eps)  # 0-dim: the loop's adds skip wrapping a Python float every time
            comb = torch.softmax(comb_m.unflatten(-1, (n, n)) * scale[2] + comb_b.view(n, n), dim=-1) + eps
            comb = _sinkhorn(comb / (comb.sum(dim=-2, keepdim=True) + eps), self.iterations - 1, eps)
            collapsed = (pre.unsqueeze(-1) * streams).sum(dim=2).to(streams.dtype)
        return collapsed, post, comb

    @staticmethod
    def merge(streams: torch.Tensor, output: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """post ⊗ output + combᵀ · streams → the new streams [B, T, n, dim] in the streams' dtype, mixed in fp32 as
        DeepSeek's hc_post mixes them (transformers rounds post and comb to bf16 first)."""
        with torch.autocast(streams.device.type, enabled=False):
            mixed = torch.matmul(comb.float().transpose(-1, -2), streams.float())
            return (post.float().unsqueeze(-1) * output.float().unsqueeze(-2) + mixed).to(streams.dtype)


class HyperHead(KeepsDtype, nn.Module):
    """The final collapse of the streams into one hidden state: pre-weights only (sigmoid + ε), no mixing."""

    kept_dtype = ("fn", "base", "scale")

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.empty(n, n * config.hidden_size))
        self.base = nn.Parameter(torch.empty(n))
        self.scale = nn.Parameter(torch.empty(1))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [..., n, dim] → [..., dim]"""
        with torch.autocast(streams.device.type, enabled=False):
            mixes = _normed_mixes(streams, self.fn, self.norm_eps)
            pre = torch.sigmoid(mixes * self.scale.float() + self.base.float()) + self.eps
            return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)


class HyperBlock(nn.Module):
    """A V4 block: attention, then MoE, each collapsed from and spread back into the streams by its own mHC."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        # an MTP depth (index past the main layers) slides and routes by learned scores: DeepSeek's released
        # compress_ratios give the MTP layer 0
        main = layer_index < config.num_hidden_layers
        self.attn_hc, self.mlp_hc = HyperConnection(config), HyperConnection(config)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = HybridAttention(config, config.layer_types[layer_index] if main else SLIDING)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config, hashed=main and config.mlp_layer_types[layer_index] == "hash_moe")

    def forward(
        self,
        streams: torch.Tensor,
        ropes: dict[str, nn.Module],
        positions: torch.Tensor,
        token_ids: torch.Tensor,
        cache: AttentionCache | None = None,
        paged: tuple[LayerStore, PagedBatch] | None = None,
        terms: ForwardTerms | None = None,
    ) -> torch.Tensor:
        """streams [B, T, n, dim] at positions [T] (after `cache`, if given) → [B, T, n, dim]; token_ids [B, T]
        route the hash layers. `paged`: the engine's flat batch [1, N, ...] of several sequences, each attending
        with the cache held in the layer's store. `terms` collects the auxiliary losses of a training forward."""
        x, post, comb = self.attn_hc(streams)
        x = self.attn_norm(x)
        if paged is None:
            attended = self.attn(x, ropes, positions, cache, terms)
        else:
            attended = forward_segments(self.attn, x, ropes, *paged)
        streams = HyperConnection.merge(streams, attended, post, comb)
        x, post, comb = self.mlp_hc(streams)
        return HyperConnection.merge(streams, self.mlp(self.mlp_norm(x), token_ids, terms), post, comb)


class HyperMTP(nn.Module):
    """V4's MTP depth k (DeepSeek's MTPBlock), on the previous depth's streams h [B, T, n, dim]:

        streams = HyperBlock(e_proj(enorm(Emb(t_{i+k}))) + h_proj(hnorm(h)))   the embedding added to every stream
        logits  = head(norm(hc_head(streams)))                                   its own collapse; the shared head

    Embedding and output head are the main model's (shared, not copied)."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        dim = config.hidden_size
        self.enorm, self.hnorm = RMSNorm(dim, config.rms_norm_eps), RMSNorm(dim, config.rms_norm_eps)
        self.e_proj, self.h_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.block = HyperBlock(config, layer_index)
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(dim, config.rms_norm_eps)

    def forward(
        self,
        streams: torch.Tensor,
        next_embeddings: torch.Tensor,
        ropes: dict[str, nn.Module],
        positions: torch.Tensor,
        next_ids: torch.Tensor,
        cache: AttentionCache | None = None,
        paged: tuple[LayerStore, PagedBatch] | None = None,
        terms: ForwardTerms | None = None,
    ) -> torch.Tensor:
        """streams [B, T, n, dim] and the next tokens' embeddings [B, T, dim] (ids [B, T]) → [B, T, n, dim]."""
        x = self.e_proj(self.enorm(next_embeddings)).unsqueeze(2) + self.h_proj(self.hnorm(streams))
        return self.block(x, ropes, positions, next_ids, cache, paged, terms)

    def head_input(self, streams: torch.Tensor) -> torch.Tensor:
        """[..., n, dim] → what the shared head reads [..., dim]."""
        return self.norm(self.hc_head(streams))
