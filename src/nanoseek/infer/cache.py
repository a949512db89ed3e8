"""MLA's inference cache: per layer and token, only the normalized latent c_KV (kv_lora_rank) and the rotated
shared RoPE key (qk_rope_head_dim) — 576 elements at V3 shape, against 2·128·128 for an MHA of the same heads.

Preallocated to the maximum length and addressed by position, so a rejected speculative token needs no rollback:
the next write to that position simply overwrites it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.config import ModelConfig


@dataclass
class LayerCache:
    latent: torch.Tensor  # [B, max_len, kv_lora_rank]
    k_rope: torch.Tensor  # [B, max_len, qk_rope_head_dim]
    span: int  # positions 0..span-1 are what this forward's queries may attend to (known once per forward)

    def write(self, positions: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """positions [B, T] ← latent [B, T, C], k_rope [B, T, R]."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
        self.latent[rows, positions] = latent.to(self.latent.dtype)
        self.k_rope[rows, positions] = k_rope.to(self.k_rope.dtype)


class LatentCache:
    """One LayerCache per main-model layer, then one per MTP module (they attend over their own inputs)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        if max_len > config.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        layers = config.num_hidden_layers + config.num_nextn_predict_layers
        self.latent = torch.zeros(layers, batch_size, max_len, config.kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(layers, batch_size, max_len, config.qk_rope_head_dim, device=device, dtype=dtype)
        self.num_hidden_layers = config.num_hidden_layers
        self.max_len = max_len

    def layer(self, index: int, span: int) -> LayerCache:
        return LayerCache(self.latent[index], self.k_rope[index], span)

    def mtp_layer(self, depth: int, span: int) -> LayerCache:
        return self.layer(self.num_hidden_layers + depth, span)

    def bytes_per_token(self, main_model_only: bool = True) -> int:
        """Cache bytes one token occupies across the (main-model) layers."""
        layers = self.num_hidden_layers if main_model_only else self.latent.shape[0]
        per_layer = (self.latent.shape[-1] + self.k_rope.shape[-1]) * self.latent.element_size()
        return layers * per_layer
