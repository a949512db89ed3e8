"""The compute study's dense baseline: V3's decoder (deepseek_v3/model.py) with Llama's grouped-query attention;
its config keeps every layer dense (config.py's `_check_dense_baseline`)."""

from __future__ import annotations

from typing import ClassVar, NoReturn

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.llama.attention import GroupedQueryAttention


class LlamaModel(DeepseekV3Model):
    architectures = ("llama",)
    attention = GroupedQueryAttention


NOT_SERVED = (
    "generation runs over MLA's latent cache; the dense GQA baseline is saved in Llama layout for transformers to "
    "sample from"
)


class GroupedLayout:
    """GQA's cache is counted (`nanoseek info`) but not served: the engine's paged store holds MLA latents."""

    keeps_state: ClassVar[bool] = False
    drafts: ClassVar[bool] = False

    def cache_bytes(self, config: ModelConfig, context: int, bytes_per_element: int = 2) -> int:
        """A key and a value of head_dim per KV head, token and layer."""
        return 2 * config.num_key_value_heads * config.head_dim * config.num_hidden_layers * context * bytes_per_element

    def serving_bytes(self, config: ModelConfig, context: int, element_size: int) -> NoReturn:
        raise NanoseekError(NOT_SERVED)

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
    ) -> NoReturn:
        raise NanoseekError(NOT_SERVED)
