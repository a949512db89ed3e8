"""DeepSeek-V4's config, as transformers' DeepseekV4Config names its fields, and its config.json both as transformers
writes it and as DeepSeek's release ships it (per-layer `compress_ratios`, `num_hash_layers`, `qk_rope_head_dim`, a
top-level `rope_scaling`), which transformers folds in the same way.

One shared key/value head of head_dim (its last qk_rope_head_dim rotated) over a sliding window of raw tokens, plus
per layer_types the compressed entries of every compress_rate_* tokens (CSA: with a lightning indexer of the index_*
fields; HCA: all of them); hc_mult residual streams mixed by Sinkhorn-projected matrices; every layer MoE, the
mlp_layer_types "hash_moe" ones routed by a fixed token → experts table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from nanoseek.errors import ConfigError
from nanoseek.models.common.config import MoEConfig, RopeScaling, Style, hf_fields, require
from nanoseek.models.deepseek_v32.config import check_indexer

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
MLP_LAYER_TYPES = ("hash_moe", "moe")


@dataclass(frozen=True)
class DeepseekV4Config(MoEConfig):
    architecture: ClassVar[str] = "deepseek_v4"
    model_types: ClassVar[tuple[str, ...]] = ("deepseek_v4",)
    attention_kind: ClassVar[str] = "V4"

    q_lora_rank: int = 1024
    qk_rope_head_dim: int = 64
    head_dim: int = 512  # the one shared key/value head
    index_n_heads: int = 0
    index_head_dim: int = 128
    index_topk: int = 512
    layer_types: tuple[str, ...] = ()
    mlp_layer_types: tuple[str, ...] = ()
    sliding_window: int = 128
    compress_rate_csa: int = 4
    compress_rate_hca: int = 128
    compress_rope_theta: float = 160000.0  # the compressed layers' RoPE base (with rope_scaling); rope_theta: sliding
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    o_groups: int = 8
    o_lora_rank: int = 1024
    swiglu_limit: float = 10.0  # experts clamp gate to <= limit and up to ±limit

    def check(self) -> None:
        super().check()
        n = self.num_hidden_layers
        for name, allowed in (("layer_types", LAYER_TYPES), ("mlp_layer_types", MLP_LAYER_TYPES)):
            types = getattr(self, name)
            require(len(types) == n, name, f"V4 needs one entry per layer ({n}), got {len(types)}")
            bad = [t for t in types if t not in allowed]
            require(not bad, name, f"entries must be one of {', '.join(allowed)}; got {bad[0]!r}" if bad else "")
        heads, head_dim, rope = self.num_attention_heads, self.head_dim, self.qk_rope_head_dim
        require(
            head_dim >= rope and head_dim % 2 == 0,
            "head_dim",
            f"V4's shared key/value head must be even and hold the {rope} RoPE dims, got {head_dim!r}",
        )
        require(rope > 0 and rope % 2 == 0, "qk_rope_head_dim", f"must be positive and even, got {rope}")
        require(
            self.q_lora_rank > 0, "q_lora_rank", f"V4 compresses its queries: must be positive, got {self.q_lora_rank}"
        )
        require(
            self.o_groups > 0 and heads % self.o_groups == 0,
            "o_groups",
            f"must divide the {heads} heads, got {self.o_groups}",
        )
        for name in (
            "o_lora_rank",
            "sliding_window",
            "compress_rate_csa",
            "compress_rate_hca",
            "hc_mult",
            "hc_sinkhorn_iters",
        ):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        # a window of one token: the serving ring keeps `window - 1` earlier keys, so 1 would decode otherwise than
        # the full forward (DeepSeek's models slide over 128)
        require(self.sliding_window >= 2, "sliding_window", f"must be at least 2, got {self.sliding_window}")
        require(self.hc_eps > 0, "hc_eps", f"must be positive, got {self.hc_eps}")
        require(self.swiglu_limit >= 0, "swiglu_limit", f"must be >= 0 (0: no clamp), got {self.swiglu_limit}")
        if CSA in self.layer_types:
            require(self.index_n_heads > 0, "index_n_heads", "CSA layers need a lightning indexer (index_n_heads > 0)")
            check_indexer(self, self.index_head_dim, self.index_topk)

    @property
    def qk_head_dim(self) -> int:
        return self.head_dim

    @property
    def rope_dim(self) -> int:
        """The shared head's trailing rotated part."""
        return self.qk_rope_head_dim

    def rope_parameters(self, kind: str = "main") -> tuple[float, RopeScaling | None, bool]:
        """ "main" (the sliding-window layers: rope_theta, never scaled) and "compress" (the compressed layers:
        compress_rope_theta with rope_scaling, and no YaRN factor on cos/sin)."""
        if kind == "compress":
            return self.compress_rope_theta, self.rope_scaling, False
        return self.rope_theta, None, False

    def to_hf_dict(self, style: Style = "transformers") -> dict[str, Any]:
        return v4_hf_dict(self, style)

    @classmethod
    def fields_from_hf(cls, d: dict[str, Any], model_type: str) -> dict[str, Any]:
        return v4_fields(d)


def v4_hf_dict(config: DeepseekV4Config, style: Style = "transformers") -> dict[str, Any]:
    """config.json of a V4 model: transformers' DeepseekV4Config fields ('transformers'), or DeepSeek's release
    form ('deepseek': compress_ratios per layer, num_hash_layers, rope_theta + rope_scaling)."""
    fields = hf_fields(config, ("compress_rate_csa", "compress_rate_hca"))
    rope = config.rope_scaling
    yarn = {} if rope is None else {"rope_type": "yarn", **dataclasses.asdict(rope)}
    out: dict[str, Any] = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        **fields,
        "rope_theta": config.rope_theta,  # both forms: transformers' V4 keeps it beside rope_parameters
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
    require(
        hashed == ["hash_moe"] * out["num_hash_layers"] + ["moe"] * (len(hashed) - out["num_hash_layers"]),
        "mlp_layer_types",
        "DeepSeek's config form (num_hash_layers) needs the hash layers first",
    )
    out["rope_scaling"] = {"type": "yarn", **{k: v for k, v in yarn.items() if k != "rope_type"}} if yarn else None
    return out


def _nested_rope(d: dict[str, Any]) -> None:
    """transformers' rope_parameters {"main": ..., "compress": ...} → rope_theta, compress_rope_theta and the
    compressed layers' YaRN as a top-level rope_scaling (what ModelConfig.from_hf_dict reads next)."""
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
    """A V4 config.json (either form) as DeepseekV4Config fields."""
    d = dict(raw)
    if d.get("num_key_value_heads") not in (None, 1):
        raise ConfigError(
            f"config field 'num_key_value_heads': V4 attention has one shared key/value head, got "
            f"{d['num_key_value_heads']!r}"
        )
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
