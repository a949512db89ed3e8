"""Named model shapes: CPU-sized demos, the dense baseline of the compute study, and DeepSeek's published ones."""

from __future__ import annotations

from nanoseek.config import DeepseekV3Config, DeepseekV4Config, DeepseekV32Config, LlamaConfig, ModelConfig, RopeScaling
from nanoseek.errors import ConfigError
from nanoseek.models.deepseek_v4.config import CSA, HCA, SLIDING

_V3_YARN = RopeScaling(
    factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0
)

# V4's compressed layers extend 64K to 1M tokens with YaRN (sliding-window layers keep plain RoPE)
_V4_YARN = RopeScaling(factor=16.0, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1)


def _v4(layers: int, first: str, **shape) -> DeepseekV4Config:
    """A V4 shape as DeepSeek's released compress_ratios lay it out: two `first` layers, then CSA and HCA alternating
    (CSA on even layers), one sliding MTP layer; the first three layers hash-routed, sqrt-softplus routing without
    groups, clamped SwiGLU, 1M context."""
    return DeepseekV4Config(
        num_hidden_layers=layers,
        head_dim=512,
        qk_rope_head_dim=64,
        layer_types=(first, first, *(HCA if i % 2 else CSA for i in range(layers - 2))),
        num_nextn_predict_layers=1,
        mlp_layer_types=("hash_moe",) * 3 + ("moe",) * (layers - 3),
        scoring_func="sqrtsoftplus",
        routed_scaling_factor=1.5,
        swiglu_limit=10.0,
        max_position_embeddings=1048576,
        rope_scaling=_V4_YARN,
        bos_token_id=0,
        eos_token_id=1,
        **shape,
    )


PRESETS: dict[str, ModelConfig] = {
    # CPU demo: trains to play-like text in minutes on 2 cores. A V3 in miniature: query compression, sigmoid
    # group-limited routing, a shared expert, a dense first layer and one MTP module.
    "tiny": DeepseekV3Config(
        vocab_size=4096,
        hidden_size=192,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        num_nextn_predict_layers=1,
    ),
    # tiny with DeepSeek-V3.2's sparse attention: each layer's lightning indexer (8 heads of 32) keeps 64 tokens
    "tiny-v32": DeepseekV32Config(
        vocab_size=4096,
        hidden_size=192,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        max_position_embeddings=256,
        num_nextn_predict_layers=1,
        index_n_heads=8,
        index_head_dim=32,
        index_topk=64,
    ),
    # tiny as DeepSeek-V4: one shared KV head of 64 over a 32-token window, then CSA (entries of 4 tokens, the
    # indexer keeps 16) and HCA (of 16 tokens) layers; 4 residual streams; the first layer hash-routed
    "tiny-v4": DeepseekV4Config(
        vocab_size=4096,
        hidden_size=192,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        q_lora_rank=96,
        qk_rope_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        routed_scaling_factor=1.5,
        scoring_func="sqrtsoftplus",
        max_position_embeddings=256,
        head_dim=64,
        layer_types=(SLIDING, CSA, HCA, CSA),
        mlp_layer_types=("hash_moe", "moe", "moe", "moe"),
        sliding_window=32,
        compress_rate_csa=4,
        compress_rate_hca=16,
        hc_mult=4,
        o_groups=2,
        o_lora_rank=64,
        swiglu_limit=10.0,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=16,
    ),
    # The compute study's dense baseline (Llama 3 style): the tiny shape with GQA and a SwiGLU MLP in every layer,
    # sized to tiny's training FLOPs per token without MTP (13.3M vs 13.2M at seq 128; 2.12M active parameters each).
    "tiny-dense": LlamaConfig(
        vocab_size=4096,
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,
        max_position_embeddings=256,
    ),
    "small": DeepseekV3Config(
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=1536,
        moe_intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=8,
        q_lora_rank=192,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        max_position_embeddings=1024,
        num_nextn_predict_layers=1,
    ),
    # One GPU: ~1B parameters (0.3B active), the size of the GPU throughput and FP8 step-time checks
    # (benchmarks/gpu_check.sh).
    "1b": DeepseekV3Config(
        vocab_size=32768,
        hidden_size=1536,
        intermediate_size=4096,
        moe_intermediate_size=512,
        num_hidden_layers=12,
        num_attention_heads=12,
        q_lora_rank=512,
        kv_lora_rank=256,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        max_position_embeddings=4096,
        num_nextn_predict_layers=1,
    ),
    "v2-lite": DeepseekV3Config(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        scoring_func="softmax",
        norm_topk_prob=False,
        first_k_dense_replace=1,
        max_position_embeddings=163840,
        rope_scaling=RopeScaling(
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32,
            beta_slow=1,
            mscale=0.707,
            mscale_all_dim=0.707,
        ),
        bos_token_id=100000,
        eos_token_id=100001,
    ),
    "v3": DeepseekV3Config(
        max_position_embeddings=163840,
        rope_scaling=_V3_YARN,
        num_nextn_predict_layers=1,
        bos_token_id=0,
        eos_token_id=1,
    ),
    # V3 with DeepSeek Sparse Attention: 64 indexer heads of 128, top 2048 tokens per query
    "v32": DeepseekV32Config(
        max_position_embeddings=163840,
        rope_scaling=_V3_YARN,
        num_nextn_predict_layers=1,
        bos_token_id=0,
        eos_token_id=1,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=2048,
    ),
    # DeepSeek-V4-Flash (284B total, 13B active) and V4-Pro (1.6T, 49B); the layer layouts are transformers' V4-Pro
    # default (V4-Flash starting with two sliding-only layers), the rest the published configs
    "v4-flash": _v4(
        43,
        SLIDING,
        vocab_size=129280,
        hidden_size=4096,
        moe_intermediate_size=2048,
        num_attention_heads=64,
        q_lora_rank=1024,
        n_routed_experts=256,
        num_experts_per_tok=6,
        o_groups=8,
        o_lora_rank=1024,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=512,
    ),
    "v4-pro": _v4(
        61,
        HCA,
        vocab_size=129280,
        hidden_size=7168,
        moe_intermediate_size=3072,
        num_attention_heads=128,
        q_lora_rank=1536,
        n_routed_experts=384,
        num_experts_per_tok=6,
        o_groups=16,
        o_lora_rank=1024,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=1024,
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
