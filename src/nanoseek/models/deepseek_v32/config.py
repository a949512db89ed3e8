"""DeepSeek-V3.2's config: V3's plus DeepSeek Sparse Attention's lightning indexer, which scores every earlier token
per layer so that attention runs over the top `index_topk` of them (the V3.2 report: 64 heads of 128, top 2048)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nanoseek.models.common.config import ModelConfig, require
from nanoseek.models.deepseek_v3.config import DeepseekV3Config


def check_indexer(config: ModelConfig, head_dim: int, topk: int) -> None:
    """The indexer's checks, shared with V4's CSA layers."""
    rope = config.rope_dim
    require(
        head_dim >= rope and head_dim % 2 == 0,
        "index_head_dim",
        f"must be even and hold the {rope} RoPE dims, got {head_dim}",
    )
    require(topk > 0, "index_topk", f"must be positive, got {topk}")


@dataclass(frozen=True)
class DeepseekV32Config(DeepseekV3Config):
    architecture: ClassVar[str] = "deepseek_v32"
    model_types: ClassVar[tuple[str, ...]] = ("deepseek_v32",)
    sparse_attention: ClassVar[bool] = True

    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048

    def check(self) -> None:
        super().check()
        require(self.index_n_heads > 0, "index_n_heads", f"V3.2's indexer needs heads, got {self.index_n_heads}")
        require(
            self.q_lora_rank is not None,
            "index_n_heads",
            "the lightning indexer reads MLA's compressed query: it needs a q_lora_rank",
        )
        check_indexer(self, self.index_head_dim, self.index_topk)

    @property
    def cache_width(self) -> int:
        """V3's [c_KV; k_rope] and the indexer's key."""
        return super().cache_width + self.index_head_dim

    def hf_model_type(self) -> tuple[str, str]:
        return "deepseek_v32", "DeepseekV32ForCausalLM"
