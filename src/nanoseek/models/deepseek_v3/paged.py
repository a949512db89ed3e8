"""MLA's serving cache (V3, V3.2): every layer's [c_KV; k_rope] per token in fixed-size blocks (and V3.2's indexer
keys beside them, models/common/paged.py's PagedStore); nothing of a sequence lives outside its blocks."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.models.common.paged import PagedStore


class LatentLayout:
    keeps_state: ClassVar[bool] = False
    drafts: ClassVar[bool] = True

    def cache_bytes(self, config: ModelConfig, context: int, bytes_per_element: int = 2) -> int:
        """kv_lora_rank + qk_rope_head_dim (+ V3.2's indexer key) per token and layer."""
        return config.cache_width * config.num_hidden_layers * context * bytes_per_element

    def serving_bytes(self, config: ModelConfig, context: int, element_size: int) -> int:
        return (
            context * (config.num_hidden_layers + config.num_nextn_predict_layers) * config.cache_width * element_size
        )

    def state_bytes(self, config: ModelConfig, element_size: int) -> int:
        return 0

    def build(
        self,
        model: nn.Module,
        memory_bytes: int,
        block_size: int,
        states: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> PagedStore:
        """→ zeros [layers + MTP modules, blocks · block_size, kv_lora_rank + rope] (and V3.2's indexer keys
        [..., index_head_dim]), as many whole blocks as fit."""
        config = model.config
        layers = config.num_hidden_layers + config.num_nextn_predict_layers
        block_bytes = self.serving_bytes(config, block_size, torch.finfo(dtype).bits // 8)
        blocks = memory_bytes // block_bytes
        if blocks < 1:
            raise ValueError(
                f"the cache memory ({memory_bytes} bytes) holds no block of {block_size} tokens ({block_bytes} bytes)"
            )

        def zeros(width: int) -> torch.Tensor:
            return torch.zeros(layers, blocks * block_size, width, device=device, dtype=dtype)

        latent_width = config.kv_lora_rank + config.qk_rope_head_dim
        return PagedStore(zeros(latent_width), zeros(config.index_head_dim) if config.sparse_attention else None)
