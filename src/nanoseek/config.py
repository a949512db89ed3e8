"""ModelConfig: the DeepSeek-V3 architecture under the field names of HF's DeepseekV3Config.

Using HF names means config.json round-trips with transformers and with the published DeepSeek checkpoints; the
names inside the model code are ours (see checkpoint/hf.py for the only place that knows HF parameter names).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nanoseek.errors import ConfigError
from nanoseek.llama import llama_fields, llama_hf_dict
from nanoseek.v4config import V4_FIELDS, check_v4, v4_fields, v4_hf_dict
from nanoseek.validate import check_field_types


@dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (the only RoPE scaling DeepSeek uses)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self) -> None:
        check_field_types(self, "config rope_scaling")
        _require(self.factor >= 1.0, "rope_scaling.factor", f"must be >= 1, got {self.factor}")
        _require(
            self.original_max_position_embeddings > 0,
            "rope_scaling.original_max_position_embeddings",
            f"must be positive, got {self.original_max_position_embeddings}",
        )
        _require(
            self.beta_fast > self.beta_slow > 0,
            "rope_scaling.beta_fast",
            f"needs beta_fast > beta_slow > 0, got {self.beta_fast} and {self.beta_slow}",
        )


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP of the first layers
    moe_intermediate_size: int = 2048  # one routed or shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: plain query projection (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: Literal["sigmoid", "softmax", "sqrtsoftplus"] = "sigmoid"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    initializer_range: float = 0.006  # V3 report
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # The dense baseline (Llama 3 style, HF layout LlamaForCausalLM): grouped-query attention with every head
    # dimension rotated and a SwiGLU MLP in every layer. The MLA and MoE fields above are then unused.
    attention_type: Literal["mla", "gqa", "v4"] = "mla"
    num_key_value_heads: int | None = None  # gqa: key/value heads, each shared by a group of query heads
    head_dim: int | None = None  # gqa: per-head dimension
    # DeepSeek-V3.2's sparse attention (DSA): a lightning indexer per layer scores every earlier token and attention
    # runs over the top `index_topk` of them. index_n_heads 0: V3's dense attention (the V3.2 report: 64, 128, 2048).
    index_n_heads: int = 0
    index_head_dim: int = 128
    index_topk: int = 2048
    # DeepSeek-V4 (attention_type "v4", fields as transformers' DeepseekV4Config names them; checked in v4config.py):
    # one shared key/value head of head_dim (its last qk_rope_head_dim rotated) over a sliding window of raw tokens,
    # plus per layer_types the compressed entries of every compress_rate_* tokens (CSA: with a lightning indexer of
    # the index_* fields above; HCA: all of them); hc_mult residual streams mixed by Sinkhorn-projected matrices;
    # every layer MoE, the mlp_layer_types "hash_moe" ones routed by a fixed token → experts table.
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
    swiglu_limit: float = 0.0  # > 0: experts clamp gate to <= limit and up to ±limit (V4: 10)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # accepted for convenience in Python code
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("layer_types", "mlp_layer_types"):  # JSON lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_field_types(self, "config")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "num_experts_per_tok",
            "n_group",
            "topk_group",
            "moe_layer_freq",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                name,
                f"must be a positive integer, got {value!r}",
            )
        # beyond any published model; a typo past these would otherwise build millions of modules before failing
        _require(self.num_hidden_layers <= 1024, "num_hidden_layers", f"at most 1024, got {self.num_hidden_layers}")
        _require(
            self.num_nextn_predict_layers <= 16,
            "num_nextn_predict_layers",
            f"at most 16, got {self.num_nextn_predict_layers}",
        )
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, name, f"must be a non-negative integer, got {value!r}")
        _require(
            self.q_lora_rank is None or self.q_lora_rank > 0,
            "q_lora_rank",
            f"must be positive or null, got {self.q_lora_rank}",
        )
        _require(
            self.qk_rope_head_dim % 2 == 0,
            "qk_rope_head_dim",
            f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}",
        )
        _require(
            self.num_experts_per_tok <= self.n_routed_experts,
            "num_experts_per_tok",
            f"top-k {self.num_experts_per_tok} exceeds n_routed_experts {self.n_routed_experts}",
        )
        _require(
            self.n_routed_experts % self.n_group == 0,
            "n_group",
            f"{self.n_group} groups do not divide {self.n_routed_experts} experts",
        )
        _require(self.topk_group <= self.n_group, "topk_group", f"{self.topk_group} exceeds n_group {self.n_group}")
        experts_per_group = self.n_routed_experts // self.n_group
        _require(
            self.topk_group * experts_per_group >= self.num_experts_per_tok,
            "topk_group",
            f"{self.topk_group} groups of {experts_per_group} experts cannot hold top-k {self.num_experts_per_tok}",
        )
        _require(
            self.scoring_func == "softmax" or experts_per_group >= 2 or self.n_group == 1,
            "n_group",
            "sigmoid group scores sum the top-2 experts of a group, so groups need at least 2 experts",
        )
        _require(
            self.routed_scaling_factor > 0,
            "routed_scaling_factor",
            f"must be positive, got {self.routed_scaling_factor}",
        )
        _require(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        _require(0 < self.rms_norm_eps < 1, "rms_norm_eps", f"must be in (0, 1), got {self.rms_norm_eps}")
        _require(self.initializer_range > 0, "initializer_range", f"must be positive, got {self.initializer_range}")
        if self.attention_type == "gqa":
            self._check_dense_baseline()
        if self.attention_type == "v4":
            check_v4(self)
        if self.sparse_attention:
            self._check_sparse_attention()

    def _check_sparse_attention(self) -> None:
        _require(
            self.attention_type == "mla" and self.q_lora_rank is not None,
            "index_n_heads",
            "the lightning indexer reads MLA's compressed query: it needs attention_type mla and a q_lora_rank",
        )
        _require(
            self.index_head_dim >= self.qk_rope_head_dim and self.index_head_dim % 2 == 0,
            "index_head_dim",
            f"must be even and hold the {self.qk_rope_head_dim} RoPE dims, got {self.index_head_dim}",
        )
        _require(self.index_topk > 0, "index_topk", f"must be positive, got {self.index_topk}")

    def _check_dense_baseline(self) -> None:
        kv_heads, head_dim = self.num_key_value_heads, self.head_dim
        _require(
            isinstance(kv_heads, int) and kv_heads > 0 and self.num_attention_heads % kv_heads == 0,
            "num_key_value_heads",
            f"gqa needs a positive divisor of num_attention_heads {self.num_attention_heads}, got {kv_heads!r}",
        )
        _require(
            isinstance(head_dim, int) and head_dim > 0 and head_dim % 2 == 0,
            "head_dim",
            f"gqa needs a positive even head_dim (RoPE rotates pairs), got {head_dim!r}",
        )
        _require(
            self.first_k_dense_replace >= self.num_hidden_layers,
            "first_k_dense_replace",
            "the gqa baseline is dense (Llama layout): set it to num_hidden_layers",
        )
        _require(
            self.num_nextn_predict_layers == 0,
            "num_nextn_predict_layers",
            "the gqa baseline has no MTP modules (Llama layout): set it to 0",
        )
        _require(self.rope_scaling is None, "rope_scaling", "the gqa baseline takes no YaRN scaling")

    # ---- derived shapes -------------------------------------------------------------------------------------------
    @property
    def architecture(self) -> Literal["deepseek_v3", "deepseek_v32", "deepseek_v4", "llama"]:
        """Which model class builds this config (nanoseek.models.registry); the V2 layout is V3's."""
        if self.attention_type == "gqa":
            return "llama"
        if self.attention_type == "v4":
            return "deepseek_v4"
        return "deepseek_v32" if self.sparse_attention else "deepseek_v3"

    @property
    def sparse_attention(self) -> bool:
        """DeepSeek-V3.2: a lightning indexer picks the tokens each query attends to (V4's CSA indexes compressed
        entries instead)."""
        return self.attention_type == "mla" and self.index_n_heads > 0

    @property
    def cache_width(self) -> int:
        """Values the paged cache holds per token and layer: MLA's [c_KV; k_rope], and V3.2's indexer key."""
        return self.kv_lora_rank + self.qk_rope_head_dim + (self.index_head_dim if self.sparse_attention else 0)

    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention_type == "mla" else self.head_dim

    @property
    def attention_v_dim(self) -> int:
        return self.v_head_dim if self.attention_type == "mla" else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Dimensions of a head that RoPE rotates: MLA's decoupled key part (V4's trailing part), or all of a GQA
        head."""
        return self.head_dim if self.attention_type == "gqa" else self.qk_rope_head_dim

    def is_moe_layer(self, layer_index: int) -> bool:
        """DeepSeek's rule; MTP blocks (index >= num_hidden_layers) follow it too, so V3's layer 61 is MoE."""
        return layer_index >= self.first_k_dense_replace and layer_index % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale² when the context is extended (as the reference does)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    def replace(self, **changes: Any) -> ModelConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field {sorted(unknown)[0]!r}")
        return dataclasses.replace(self, **changes)

    # ---- config.json ----------------------------------------------------------------------------------------------
    def to_hf_dict(self, style: Literal["transformers", "deepseek"] = "transformers") -> dict[str, Any]:
        """config.json contents. 'transformers' writes transformers-5's rope_parameters; 'deepseek' the published
        DeepSeek-V3 form (rope_theta + rope_scaling, scoring_func, topk_method)."""
        if self.attention_type == "gqa":
            return llama_hf_dict(self, style)
        if self.attention_type == "v4":
            return v4_hf_dict(self, style)
        dsa = ("index_n_heads", "index_head_dim", "index_topk")
        fields = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("attention_type", "num_key_value_heads", "head_dim", *V4_FIELDS)
            and (self.sparse_attention or f.name not in dsa)
        }
        rope = fields.pop("rope_scaling")
        theta = fields.pop("rope_theta")
        # transformers' DeepseekV3 always routes with sigmoid scores; softmax routing is its DeepseekV2 model.
        v3 = self.scoring_func == "sigmoid"
        kind = (
            ("deepseek_v32", "DeepseekV32ForCausalLM")
            if self.sparse_attention
            else ("deepseek_v3", "DeepseekV3ForCausalLM")
            if v3
            else ("deepseek_v2", "DeepseekV2ForCausalLM")
        )
        out: dict[str, Any] = {
            "architectures": [kind[1]],
            "model_type": kind[0],
            **fields,
            "num_key_value_heads": self.num_attention_heads,
            "hidden_act": "silu",
            "attention_bias": False,
            "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if self.n_group > 1 else "greedy"),
        }
        rope_dict = {} if rope is None else {"type": "yarn", **dataclasses.asdict(rope)}
        if style == "transformers":
            rope_dict.pop("type", None)
            out["rope_parameters"] = {"rope_type": "yarn" if rope else "default", "rope_theta": theta, **rope_dict}
            if not self.sparse_attention:  # transformers' V3.2 always interleaves, and has no such field
                out["rope_interleave"] = True
        else:
            out["rope_theta"] = theta
            out["rope_scaling"] = rope_dict or None
        return out

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Read either config.json form (transformers-5 or the published DeepSeek V2/V3 one)."""
        d = dict(raw)
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field 'hidden_act': only 'silu' is supported, got {d['hidden_act']!r}")
        if d.get("attention_bias"):
            raise ConfigError("config field 'attention_bias': biased attention projections are not supported")
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "deepseek_v32", "deepseek_v4", "deepseek_v2", "llama"):
            raise ConfigError(
                f"config field 'model_type': deepseek_v3, deepseek_v32, deepseek_v4, deepseek_v2 or "
                f"llama, got {model_type!r}"
            )
        if model_type == "deepseek_v4":
            d = v4_fields(d)
        if model_type not in ("deepseek_v32", "deepseek_v4"):
            for name in ("index_n_heads", "index_head_dim", "index_topk", *V4_FIELDS):
                d.pop(name, None)  # a V3 config that mentions them anyway stays V3
        if model_type == "llama":
            d = llama_fields(d)
        elif model_type != "deepseek_v4":  # DeepSeek configs carry these HF fields too, but MLA has no use for them
            d.pop("num_key_value_heads", None)
            d.pop("head_dim", None)
        d.setdefault("scoring_func", "softmax" if model_type == "deepseek_v2" else "sigmoid")
        # V2's plain 'greedy' routing ignores any groups the config lists.
        if d.get("topk_method") == "greedy" or d.get("n_group") is None:
            d["n_group"], d["topk_group"] = 1, 1
        rope_params = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope_params, dict):
            raise ConfigError(
                f"config field 'rope_parameters' / 'rope_scaling': must be an object or null, got {rope_params!r}"
            )
        d["rope_theta"] = rope_params.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type == "yarn":
            names = {f.name for f in dataclasses.fields(RopeScaling)}
            yarn = {k: v for k, v in rope_params.items() if k in names and v is not None}
            yarn.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 4096))
            if "factor" not in yarn:  # the extension the two context lengths imply
                lengths = (d.get("max_position_embeddings", 4096), yarn["original_max_position_embeddings"])
                if not all(isinstance(n, int) and n > 0 for n in lengths):
                    raise ConfigError(
                        f"config: a yarn rope_scaling without 'factor' needs positive integer context "
                        f"lengths, got {lengths}"
                    )
                yarn["factor"] = lengths[0] / lengths[1]
            d["rope_scaling"] = RopeScaling(**yarn)
        elif rope_type == "default":
            d["rope_scaling"] = None
        else:
            raise ConfigError(f"config field 'rope_scaling': rope type {rope_type!r} is not supported (yarn only)")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            d["eos_token_id"] = eos[0] if eos else None
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise ConfigError(f"config: {e}") from None

    def save_json(self, path: str | Path, style: Literal["transformers", "deepseek"] = "transformers") -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(style), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_hf_dict(raw)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction: 0.1·mscale·ln(factor) + 1 (1 when not extended)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config field {name!r}: {why}")
