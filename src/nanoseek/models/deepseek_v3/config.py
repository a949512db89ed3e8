"""DeepSeek-V3's config (and the V2 layout's: softmax routing): Multi-head Latent Attention over DeepSeekMoE with
group-limited routing and dense first layers, under the field names of HF's DeepseekV3Config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from nanoseek.models.common.config import MoEConfig, Style, hf_fields, require, require_positive


@dataclass(frozen=True)
class DeepseekV3Config(MoEConfig):
    architecture: ClassVar[str] = "deepseek_v3"
    model_types: ClassVar[tuple[str, ...]] = ("deepseek_v3", "deepseek_v2")
    attention_kind: ClassVar[str] = "MLA"

    intermediate_size: int = 18432  # dense MLP of the first layers
    q_lora_rank: int | None = 1536  # None: plain query projection (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1

    def check(self) -> None:
        super().check()
        require_positive(
            self,
            ("intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group"),
        )
        require_positive(self, ("topk_group", "moe_layer_freq"))
        require(
            isinstance(self.first_k_dense_replace, int) and self.first_k_dense_replace >= 0,
            "first_k_dense_replace",
            f"must be a non-negative integer, got {self.first_k_dense_replace!r}",
        )
        require(
            self.q_lora_rank is None or self.q_lora_rank > 0,
            "q_lora_rank",
            f"must be positive or null, got {self.q_lora_rank}",
        )
        require(
            self.qk_rope_head_dim % 2 == 0,
            "qk_rope_head_dim",
            f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}",
        )
        require(
            self.n_routed_experts % self.n_group == 0,
            "n_group",
            f"{self.n_group} groups do not divide {self.n_routed_experts} experts",
        )
        require(self.topk_group <= self.n_group, "topk_group", f"{self.topk_group} exceeds n_group {self.n_group}")
        experts_per_group = self.n_routed_experts // self.n_group
        require(
            self.topk_group * experts_per_group >= self.num_experts_per_tok,
            "topk_group",
            f"{self.topk_group} groups of {experts_per_group} experts cannot hold top-k {self.num_experts_per_tok}",
        )
        require(
            self.scoring_func == "softmax" or experts_per_group >= 2 or self.n_group == 1,
            "n_group",
            "sigmoid group scores sum the top-2 experts of a group, so groups need at least 2 experts",
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attention_v_dim(self) -> int:
        return self.v_head_dim

    @property
    def rope_dim(self) -> int:
        """MLA's decoupled key part."""
        return self.qk_rope_head_dim

    @property
    def baseline_head_dim(self) -> int:
        """The papers' MHA baseline for MLA: d_h = qk_nope_head_dim (128 at V2/V3 shape)."""
        return self.qk_nope_head_dim

    @property
    def cache_width(self) -> int:
        """Values the paged cache holds per token and layer: MLA's [c_KV; k_rope] (V3.2 adds its indexer key)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def hf_model_type(self) -> tuple[str, str]:
        # transformers' DeepseekV3 always routes with sigmoid scores; softmax routing is its DeepseekV2 model.
        if self.scoring_func == "sigmoid":
            return "deepseek_v3", "DeepseekV3ForCausalLM"
        return "deepseek_v2", "DeepseekV2ForCausalLM"

    def to_hf_dict(self, style: Style = "transformers") -> dict[str, Any]:
        model_type, architecture = self.hf_model_type()
        sigmoid = self.scoring_func == "sigmoid"  # DeepSeek-V3's noaux_tc routing
        out: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": model_type,
            **hf_fields(self),
            "num_key_value_heads": self.num_attention_heads,
            "hidden_act": "silu",
            "attention_bias": False,
            "topk_method": "noaux_tc" if sigmoid else ("group_limited_greedy" if self.n_group > 1 else "greedy"),
        }
        rope = self.rope_scaling
        rope_dict = {} if rope is None else {"type": "yarn", **dataclasses.asdict(rope)}
        if style == "transformers":
            rope_dict.pop("type", None)
            out["rope_parameters"] = {"rope_type": "yarn" if rope else "default", "rope_theta": self.rope_theta}
            out["rope_parameters"].update(rope_dict)
            if not self.sparse_attention:  # transformers' V3.2 always interleaves, and has no such field
                out["rope_interleave"] = True
        else:
            out["rope_theta"] = self.rope_theta
            out["rope_scaling"] = rope_dict or None
        return out

    @classmethod
    def fields_from_hf(cls, d: dict[str, Any], model_type: str) -> dict[str, Any]:
        d.setdefault("scoring_func", "softmax" if model_type == "deepseek_v2" else "sigmoid")
        # V2's plain 'greedy' routing ignores any groups the config lists.
        if d.get("topk_method") == "greedy" or d.get("n_group") is None:
            d["n_group"], d["topk_group"] = 1, 1
        return d
