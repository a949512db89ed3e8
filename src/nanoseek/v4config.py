"""DeepSeek-V4's part of ModelConfig: its checks and its config.json, both as transformers' DeepseekV4Config writes
it and as DeepSeek's release ships it (per-layer `compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, a
top-level `rope_scaling`), which transformers folds in the same way."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

from nanoseek.errors import ConfigError

if TYPE_CHECKING:
    from nanoseek.config import ModelConfig

# ModelConfig's V4-only fields: no other model's config.json has them
V4_FIELDS = (
    "layer_types",
    "mlp_layer_types",
    "sliding_window",
    "compress_rate_csa",
    "compress_rate_hca",
    "compress_rope_theta",
    "hc_mult",
    "hc_sinkhorn_iters",
    "hc_eps",
    "o_groups",
    "o_lora_rank",
    "swiglu_limit",
)
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
MLP_LAYER_TYPES = ("hash_moe", "moe")
# the MLA / dense-MLP fields a V4 config.json has no use for: written by nobody, ignored on load
_UNUSED = (
    "intermediate_size",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "v_head_dim",
    "n_group",
    "topk_group",
    "first_k_dense_replace",
    "moe_layer_freq",
    "attention_type",
    "compress_rate_csa",
    "compress_rate_hca",
)


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config field {name!r}: {why}")


def check_v4(config: ModelConfig) -> None:
    n = config.num_hidden_layers
    for name, allowed in (("layer_types", LAYER_TYPES), ("mlp_layer_types", MLP_LAYER_TYPES)):
        types = getattr(config, name)
        _require(len(types) == n, name, f"V4 needs one entry per layer ({n}), got {len(types)}")
        bad = [t for t in types if t not in allowed]
        _require(not bad, name, f"entries must be one of {', '.join(allowed)}; got {bad[0]!r}" if bad else "")
    heads, head_dim, rope = config.num_attention_heads, config.head_dim, config.qk_rope_head_dim
    _require(
        isinstance(head_dim, int) and head_dim >= rope and head_dim % 2 == 0,
        "head_dim",
        f"V4's shared key/value head must be even and hold the {rope} RoPE dims, got {head_dim!r}",
    )
    _require(
        config.num_key_value_heads in (None, 1),
        "num_key_value_heads",
        f"V4 attention has one shared key/value head, got {config.num_key_value_heads}",
    )
    _require(config.q_lora_rank is not None, "q_lora_rank", "V4 compresses its queries: it needs a q_lora_rank")
    _require(
        config.o_groups > 0 and heads % config.o_groups == 0,
        "o_groups",
        f"must divide the {heads} heads, got {config.o_groups}",
    )
    for name in (
        "o_lora_rank",
        "sliding_window",
        "compress_rate_csa",
        "compress_rate_hca",
        "hc_mult",
        "hc_sinkhorn_iters",
    ):
        _require(getattr(config, name) > 0, name, f"must be positive, got {getattr(config, name)}")
    _require(config.hc_eps > 0, "hc_eps", f"must be positive, got {config.hc_eps}")
    _require(config.swiglu_limit >= 0, "swiglu_limit", f"must be >= 0 (0: no clamp), got {config.swiglu_limit}")
    if CSA in config.layer_types:
        _require(config.index_n_heads > 0, "index_n_heads", "CSA layers need a lightning indexer (index_n_heads > 0)")
        _require(
            config.index_head_dim >= rope and config.index_head_dim % 2 == 0,
            "index_head_dim",
            f"must be even and hold the {rope} RoPE dims, got {config.index_head_dim}",
        )
        _require(config.index_topk > 0, "index_topk", f"must be positive, got {config.index_topk}")
    _require(
        config.first_k_dense_replace == 0 and config.moe_layer_freq == 1,
        "first_k_dense_replace",
        "every V4 layer is MoE: set first_k_dense_replace 0 and moe_layer_freq 1",
    )
    _require(config.n_group == 1, "n_group", "V4 routes without expert groups: set n_group and topk_group to 1")


def v4_hf_dict(config: ModelConfig, style: Literal["transformers", "deepseek"] = "transformers") -> dict[str, Any]:
    """config.json of a V4 model: transformers' DeepseekV4Config fields ('transformers'), or DeepSeek's release
    form ('deepseek': compress_ratios per layer, num_hash_layers, rope_theta + rope_scaling)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _UNUSED}
    rope = fields.pop("rope_scaling")
    yarn = {} if rope is None else {"rope_type": "yarn", **dataclasses.asdict(rope)}
    out: dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        **fields,
        "num_key_value_heads": 1,
        "hidden_act": "silu",
        "attention_bias": False,
    }
    out["layer_types"], out["mlp_layer_types"] = list(config.layer_types), list(config.mlp_layer_types)
    out["compress_rates"] = {CSA: config.compress_rate_csa, HCA: config.compress_rate_hca}
    if style == "transformers":
        out["partial_rotary_factor"] = config.qk_rope_head_dim / config.head_dim
        compress = {"rope_type": "default", **yarn, "rope_theta": config.compress_rope_theta}
        if rope is not None:
            compress["attention_factor"] = 1.0  # V4 does not scale cos/sin by YaRN's mscale
        out["rope_parameters"] = {
            "main": {"rope_type": "default", "rope_theta": config.rope_theta},
            "compress": compress,
        }
        return out
    rates = {SLIDING: 0, CSA: config.compress_rate_csa, HCA: config.compress_rate_hca}
    mtp_layers = [0] * config.num_nextn_predict_layers  # MTP layers slide (models/deepseek_v4/hyper.py: HyperMTP)
    out["compress_ratios"] = [rates[t] for t in out.pop("layer_types")] + mtp_layers
    hashed = out.pop("mlp_layer_types")
    out["num_hash_layers"] = hashed.count("hash_moe")
    _require(
        hashed == ["hash_moe"] * out["num_hash_layers"] + ["moe"] * (len(hashed) - out["num_hash_layers"]),
        "mlp_layer_types",
        "DeepSeek's config form (num_hash_layers) needs the hash layers first",
    )
    out["rope_scaling"] = {"type": "yarn", **{k: v for k, v in yarn.items() if k != "rope_type"}} if yarn else None
    return out


def _nested_rope(d: dict[str, Any]) -> None:
    """transformers' rope_parameters {"main": ..., "compress": ...} → rope_theta, compress_rope_theta and the
    compressed layers' YaRN as a top-level rope_scaling (what ModelConfig.from_hf_dict reads)."""
    rope = d.pop("rope_parameters", None)
    if rope is None or not ({"main", "compress"} & set(rope if isinstance(rope, dict) else ())):
        if rope is not None:
            d["rope_scaling"] = rope
        return
    main, compress = rope.get("main") or {}, dict(rope.get("compress") or {})
    if not isinstance(main, dict) or not isinstance(compress, dict):
        raise ConfigError("config field 'rope_parameters': 'main' and 'compress' must be objects")
    d["rope_theta"] = main.get("rope_theta", d.get("rope_theta", 10000.0))
    d["compress_rope_theta"] = compress.pop("rope_theta", d.get("compress_rope_theta", 160000.0))
    if compress.pop("attention_factor", 1.0) != 1.0:
        raise ConfigError("config field 'rope_parameters.compress.attention_factor': V4 takes 1.0 (no YaRN mscale)")
    compress.pop("partial_rotary_factor", None)
    d["rope_scaling"] = compress


def v4_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """A V4 config.json (either form) as ModelConfig fields."""
    d = {k: v for k, v in raw.items() if k not in _UNUSED}
    d["attention_type"], d["first_k_dense_replace"], d["n_group"], d["topk_group"] = "v4", 0, 1, 1
    d.setdefault("num_key_value_heads", 1)
    d.setdefault("swiglu_limit", 10.0)
    d.setdefault("head_dim", 512)
    d.setdefault("max_position_embeddings", 1048576)
    rates = d.pop("compress_rates", None) or {}
    if not isinstance(rates, dict):
        raise ConfigError(f"config field 'compress_rates': must be an object, got {rates!r}")
    d["compress_rate_csa"] = raw.get("compress_rate_csa", rates.get(CSA, 4))
    d["compress_rate_hca"] = raw.get("compress_rate_hca", rates.get(HCA, 128))
    if "partial_rotary_factor" in d and "qk_rope_head_dim" not in d:
        d["qk_rope_head_dim"] = round(d["head_dim"] * d.pop("partial_rotary_factor"))
    d.pop("partial_rotary_factor", None)
    d.setdefault("qk_rope_head_dim", 64)
    n = d.get("num_hidden_layers", 43)
    ratios = d.pop("compress_ratios", None)
    if d.get("layer_types") is None and ratios is not None:
        by_rate = {0: SLIDING, d["compress_rate_csa"]: CSA, d["compress_rate_hca"]: HCA}
        if not isinstance(ratios, list) or any(r not in by_rate for r in ratios):
            raise ConfigError(f"config field 'compress_ratios': one of {sorted(by_rate)} per layer, got {ratios!r}")
        d["layer_types"] = [by_rate[r] for r in ratios[:n]]
        if any(ratios[n:]):  # DeepSeek's list also covers the MTP layers: sliding in every release
            raise ConfigError(
                f"config field 'compress_ratios': nanoseek's MTP layers slide (ratio 0), got "
                f"{ratios[n:]} past the {n} main layers"
            )
    if d.get("layer_types") is None:  # transformers' default: two HCA layers, then CSA and HCA alternating
        d["layer_types"] = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    hashed = d.pop("num_hash_layers", 3)
    if d.get("mlp_layer_types") is None:
        d["mlp_layer_types"] = ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)
    _nested_rope(d)
    return d
