"""The dense baseline in HF's Llama layout (LlamaForCausalLM): config.json fields and the RoPE row order.

nanoseek rotates interleaved pairs (x0, x1), (x2, x3), ... of a head, as DeepSeek's weights expect; Llama rotates
x_i with x_{i + d/2}. Storing each head's q/k projection rows as [even rows; odd rows] makes the two agree exactly
(the same permutation Meta → HF conversions apply), so a saved baseline runs unchanged in transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from nanoseek.errors import ConfigError

if TYPE_CHECKING:
    from nanoseek.config import ModelConfig


def llama_hf_dict(config: ModelConfig, style: Literal["transformers", "deepseek"] = "transformers") -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{
            name: getattr(config, name)
            for name in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
                "rms_norm_eps",
                "initializer_range",
                "tie_word_embeddings",
                "bos_token_id",
                "eos_token_id",
            )
        },
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if style == "transformers":
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
    else:
        out["rope_theta"] = config.rope_theta
    return out


def llama_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """A Llama config.json as ModelConfig fields: GQA, a dense MLP in every layer, no MTP."""
    if raw.get("mlp_bias"):
        raise ConfigError("config field 'mlp_bias': biased MLPs are not supported")
    for name in ("num_attention_heads", "hidden_size", "num_hidden_layers"):
        if not isinstance(raw.get(name), int) or isinstance(raw[name], bool) or raw[name] < 1:
            raise ConfigError(f"config field {name!r}: a Llama config needs a positive integer, got {raw.get(name)!r}")
    heads = raw["num_attention_heads"]
    return {
        **raw,
        "attention_type": "gqa",
        "num_key_value_heads": raw.get("num_key_value_heads") or heads,
        "head_dim": raw.get("head_dim") or raw["hidden_size"] // heads,
        "first_k_dense_replace": raw["num_hidden_layers"],
        "num_nextn_predict_layers": 0,
    }


def interleaved_to_halves(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q/k projection rows, per head: nanoseek's pair order → Llama's [evens; odds]."""
    rows, cols = weight.shape
    return weight.view(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.view(rows // head_dim, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)
