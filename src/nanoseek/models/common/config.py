"""What every generation's config has: the shared fields (HF's names, so config.json round-trips with transformers and
DeepSeek's releases), their checks, and the config.json reading they share. Each generation's class adds its own
fields beside its model (models/<generation>/config.py); nanoseek/config.py reads a config.json into the right one.

No torch here: the data tools read configs without importing it."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from nanoseek.errors import ConfigError
from nanoseek.validate import check_field_types

Style = Literal["transformers", "deepseek"]


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
        require(self.factor >= 1.0, "rope_scaling.factor", f"must be >= 1, got {self.factor}")
        require(
            self.original_max_position_embeddings > 0,
            "rope_scaling.original_max_position_embeddings",
            f"must be positive, got {self.original_max_position_embeddings}",
        )
        require(
            self.beta_fast > self.beta_slow > 0,
            "rope_scaling.beta_fast",
            f"needs beta_fast > beta_slow > 0, got {self.beta_fast} and {self.beta_slow}",
        )


@dataclass(frozen=True)
class ModelConfig:
    """The base of every generation's config. `ModelConfig.from_hf_dict` / `load_json` pick the class by the file's
    model_type (each class registers the model types it reads); `replace` may move to a generation that extends this
    one (V3 + an indexer field is V3.2)."""

    architecture: ClassVar[str] = ""  # the key of nanoseek.models.registry.ARCHITECTURES
    model_types: ClassVar[tuple[str, ...]] = ()  # config.json model_type values this class reads
    attention_kind: ClassVar[str] = ""  # what `nanoseek info` calls its cache: MLA, GQA, ...
    sparse_attention: ClassVar[bool] = False  # V3.2's indexer picks the tokens each query attends to
    _by_model_type: ClassVar[dict[str, type[ModelConfig]]] = {}

    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    initializer_range: float = 0.006  # V3 report
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for model_type in cls.__dict__.get("model_types", ()):
            ModelConfig._by_model_type[model_type] = cls

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # accepted for convenience in Python code
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for f in dataclasses.fields(self):  # JSON lists
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        check_field_types(self, "config")
        require_positive(
            self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")
        )
        # beyond any published model; a typo past these would otherwise build millions of modules before failing
        require(self.num_hidden_layers <= 1024, "num_hidden_layers", f"at most 1024, got {self.num_hidden_layers}")
        require(
            0 <= self.num_nextn_predict_layers <= 16,
            "num_nextn_predict_layers",
            f"must be in 0..16, got {self.num_nextn_predict_layers}",
        )
        require(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        require(0 < self.rms_norm_eps < 1, "rms_norm_eps", f"must be in (0, 1), got {self.rms_norm_eps}")
        require(self.initializer_range > 0, "initializer_range", f"must be positive, got {self.initializer_range}")
        self.check()

    def check(self) -> None:
        """The generation's own checks, run on construction after the shared ones."""

    # ---- derived shapes (each generation defines its attention's) ---------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head."""
        raise NotImplementedError

    @property
    def attention_v_dim(self) -> int:
        """Value width per head: the query/key width unless the attention says otherwise (MLA)."""
        return self.qk_head_dim

    @property
    def rope_dim(self) -> int:
        """Dimensions of a head that RoPE rotates."""
        raise NotImplementedError

    @property
    def baseline_head_dim(self) -> int:
        """Per-head dimension of the papers' MHA baseline for this attention's cache."""
        return self.qk_head_dim

    def is_moe_layer(self, layer_index: int) -> bool:
        return False

    @property
    def active_expert_fraction(self) -> float:
        """The share of the routed experts' parameters a token computes with."""
        return 1.0

    def rope_parameters(self, kind: str = "main") -> tuple[float, RopeScaling | None, bool]:
        """RoPE base, YaRN scaling and whether YaRN scales cos/sin, for the layers of `kind` (V4 has two kinds)."""
        return self.rope_theta, self.rope_scaling, True

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale² when the context is extended (as the reference does)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    # ---- changes --------------------------------------------------------------------------------------------------
    @classmethod
    def extensions(cls) -> list[type[ModelConfig]]:
        """The generations written as this one plus fields (V3 → V3.2), nearest first."""
        found = [c for c in cls.__subclasses__() if c.architecture]
        return found + [deeper for c in found for deeper in c.extensions()]

    def known_fields(self) -> dict[str, Any]:
        """What `replace` takes: this config's fields with their values, then the fields of the generations that
        extend it with their defaults."""
        known = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for extension in self.extensions():
            for f in dataclasses.fields(extension):
                known.setdefault(f.name, f.default)
        return known

    def replace(self, **changes: Any) -> ModelConfig:
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if set(changes) <= set(own):
            return dataclasses.replace(self, **changes)
        for extension in self.extensions():
            if set(changes) <= {f.name for f in dataclasses.fields(extension)}:
                return extension(**{**own, **changes})
        unknown = sorted(set(changes) - set(self.known_fields()))
        if unknown:
            raise ConfigError(f"unknown config field {unknown[0]!r} for a {self.architecture} model")
        raise ConfigError(f"config: no one generation has all of the fields {sorted(changes)}")

    # ---- config.json ----------------------------------------------------------------------------------------------
    def to_hf_dict(self, style: Style = "transformers") -> dict[str, Any]:
        """config.json contents. 'transformers' writes transformers-5's form; 'deepseek' the one DeepSeek releases."""
        raise NotImplementedError

    @classmethod
    def fields_from_hf(cls, d: dict[str, Any], model_type: str) -> dict[str, Any]:
        """A config.json of one of this class's model types as this class's field names (before RoPE is read)."""
        return d

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Read either config.json form (transformers-5 or DeepSeek's) into the class of its model_type."""
        model_type = raw.get("model_type", "deepseek_v3")
        target = ModelConfig._by_model_type.get(model_type) if isinstance(model_type, str) else None
        if target is None:
            raise ConfigError(
                f"config field 'model_type': one of {', '.join(ModelConfig._by_model_type)}, got {model_type!r}"
            )
        if cls is not ModelConfig and not issubclass(target, cls):
            raise ConfigError(f"config field 'model_type': {model_type!r} is not a {cls.__name__}")
        d = dict(raw)
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field 'hidden_act': only 'silu' is supported, got {d['hidden_act']!r}")
        if d.get("attention_bias"):
            raise ConfigError("config field 'attention_bias': biased attention projections are not supported")
        d = target.fields_from_hf(d, model_type)
        _read_rope(d)
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            d["eos_token_id"] = eos[0] if eos else None
        known = {f.name for f in dataclasses.fields(target)}
        try:
            return target(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise ConfigError(f"config: {e}") from None

    def save_json(self, path: str | Path, style: Style = "transformers") -> None:
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


def _read_rope(d: dict[str, Any]) -> None:
    """rope_parameters (transformers-5) or rope_theta + rope_scaling (DeepSeek's form) → rope_theta and a
    RopeScaling or None."""
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
                    f"config: a yarn rope_scaling without 'factor' needs positive integer context lengths, "
                    f"got {lengths}"
                )
            yarn["factor"] = lengths[0] / lengths[1]
        d["rope_scaling"] = RopeScaling(**yarn)
    elif rope_type == "default":
        d["rope_scaling"] = None
    else:
        raise ConfigError(f"config field 'rope_scaling': rope type {rope_type!r} is not supported (yarn only)")


def hf_fields(config: ModelConfig, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config's fields as config.json names them, less `leave_out` and RoPE (each form writes RoPE its own way)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in ("rope_theta", "rope_scaling", *leave_out)
    }


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction: 0.1·mscale·ln(factor) + 1 (1 when not extended)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"config field {name!r}: {why}")


def require_positive(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            name,
            f"must be a positive integer, got {value!r}",
        )


@dataclass(frozen=True)
class MoEConfig(ModelConfig):
    """DeepSeekMoE's routed and shared experts (V3's and V4's; models/common/moe.py). A generation that routes within
    expert groups, keeps dense layers first or clamps SwiGLU makes the class attributes below fields of its own."""

    n_group = 1  # expert groups, of which a token's top-k come from the best topk_group
    topk_group = 1
    first_k_dense_replace = 0  # the first layers' dense MLP
    moe_layer_freq = 1
    swiglu_limit = 0.0  # > 0: experts clamp gate to <= limit and up to ±limit

    moe_intermediate_size: int = 2048  # one routed or shared expert
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.5
    scoring_func: Literal["sigmoid", "softmax", "sqrtsoftplus"] = "sigmoid"
    norm_topk_prob: bool = True

    def check(self) -> None:
        require_positive(self, ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok"))
        require(
            isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0,
            "n_shared_experts",
            f"must be a non-negative integer, got {self.n_shared_experts!r}",
        )
        require(
            self.num_experts_per_tok <= self.n_routed_experts,
            "num_experts_per_tok",
            f"top-k {self.num_experts_per_tok} exceeds n_routed_experts {self.n_routed_experts}",
        )
        require(
            self.routed_scaling_factor > 0,
            "routed_scaling_factor",
            f"must be positive, got {self.routed_scaling_factor}",
        )

    @property
    def active_expert_fraction(self) -> float:
        return self.num_experts_per_tok / self.n_routed_experts

    def is_moe_layer(self, layer_index: int) -> bool:
        """DeepSeek's rule; MTP blocks (index >= num_hidden_layers) follow it too, so V3's layer 61 is MoE."""
        return layer_index >= self.first_k_dense_replace and layer_index % self.moe_layer_freq == 0
