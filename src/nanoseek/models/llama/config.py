"""The dense baseline's config, in HF's Llama layout (LlamaForCausalLM): grouped-query attention with every head
dimension rotated, a SwiGLU MLP in every layer, no MTP and no YaRN."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from nanoseek.errors import ConfigError
from nanoseek.models.common.config import ModelConfig, Style, hf_fields, require


@dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    architecture: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama",)
    attention_kind: ClassVar[str] = "GQA"

    intermediate_size: int = 18432
    num_key_value_heads: int | None = None  # key/value heads, each shared by a group of query heads; None: MHA
    head_dim: int | None = None  # None: hidden_size / num_attention_heads

    def check(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        kv_heads, head_dim = self.num_key_value_heads, self.head_dim
        require(self.intermediate_size > 0, "intermediate_size", f"must be positive, got {self.intermediate_size}")
        require(
            kv_heads > 0 and self.num_attention_heads % kv_heads == 0,
            "num_key_value_heads",
            f"gqa needs a positive divisor of num_attention_heads {self.num_attention_heads}, got {kv_heads!r}",
        )
        require(
            head_dim > 0 and head_dim % 2 == 0,
            "head_dim",
            f"gqa needs a positive even head_dim (RoPE rotates pairs), got {head_dim!r}",
        )
        require(
            self.num_nextn_predict_layers == 0,
            "num_nextn_predict_layers",
            "the gqa baseline has no MTP modules (Llama layout): set it to 0",
        )
        require(self.rope_scaling is None, "rope_scaling", "the gqa baseline takes no YaRN scaling")

    @property
    def qk_head_dim(self) -> int:
        return self.head_dim

    @property
    def rope_dim(self) -> int:
        """All of a GQA head."""
        return self.head_dim

    def to_hf_dict(self, style: Style = "transformers") -> dict[str, Any]:
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **hf_fields(self, ("num_nextn_predict_layers",)),
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
        if style == "transformers":
            out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            out["rope_theta"] = self.rope_theta
        return out

    @classmethod
    def fields_from_hf(cls, d: dict[str, Any], model_type: str) -> dict[str, Any]:
        if d.get("mlp_bias"):
            raise ConfigError("config field 'mlp_bias': biased MLPs are not supported")
        for name in ("num_attention_heads", "hidden_size", "num_hidden_layers"):
            if not isinstance(d.get(name), int) or isinstance(d[name], bool) or d[name] < 1:
                raise ConfigError(
                    f"config field {name!r}: a Llama config needs a positive integer, got {d.get(name)!r}"
                )
        return {**d, "num_nextn_predict_layers": 0}
