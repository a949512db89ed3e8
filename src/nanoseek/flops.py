"""Model accounting: parameters (total, active, per component), training FLOPs per token, KV-cache bytes.

Counts come from the real module tree (built on the meta device, so the 671B shape costs no memory), so they
cannot drift from the code; FLOPs follow the usual 6·N (forward 2·N, backward 4·N) plus the attention core.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from nanoseek.config import ModelConfig
from nanoseek.models.registry import architecture, build_model
from nanoseek.presets import preset

COMPONENTS = (
    "embedding",
    "attention",
    "dense_mlp",
    "router",
    "shared_experts",
    "routed_experts",
    "norms",
    "head",
    "hyper_connections",
)
LONG_CONTEXTS = (4096, 131072, 1048576)  # `nanoseek info`'s long-context table


def _component(name: str) -> str:
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("head."):
        return "head"
    if name.startswith("hc_head.") or "_hc." in name:
        return "hyper_connections"
    if "norm" in name.rsplit(".", 2)[-2]:
        return "norms"
    if ".attn." in name:
        return "attention"
    for marker, component in (
        (".mlp.experts.", "routed_experts"),
        (".mlp.shared.", "shared_experts"),
        (".mlp.router.", "router"),
    ):
        if marker in name:
            return component
    return "dense_mlp"


@dataclass(frozen=True)
class ModelStats:
    total_params: int  # main model (what "671B" counts), excluding MTP
    active_params: int  # per token: the picked experts and the head, not the embedding table
    mtp_params: int  # MTP modules as stored in a checkpoint (with their copies of embedding and head)
    mtp_unique_params: int  # MTP modules' own parameters
    active_matrix_params: int  # what a token multiplies through: active_params less the elementwise (_elementwise)
    components: dict[str, int]  # main-model parameters by component
    active_components: dict[str, int]
    seq_len: int
    flops_per_token: float  # training (forward + backward) FLOPs per token of the main model at seq_len
    mtp_flops_per_token: float  # the same for all MTP modules together
    kv_bytes_per_token: int  # this model's cache per token of a seq_len sequence (cache_bytes)
    kv_bytes_per_token_mha: int  # an MHA with the same heads: 2 · heads · d_h · layers · bytes
    kv_bytes_per_token_gqa: int  # a GQA with the same heads in groups of 8 (Llama 3's 64/8): 2 · heads/8 · d_h · ...
    kv_cache_ratio: float  # this model / MHA

    def to_dict(self) -> dict:
        return asdict(self)


def attention_core_flops(config: ModelConfig, visible: torch.Tensor, layers: int | None = None) -> torch.Tensor:
    """Forward FLOPs of QKᵀ and AV (and of choosing keys) for queries that see `visible` tokens (float64 tensor),
    summed over the model's layers, or over `layers` MTP layers: the generation's model class counts them."""
    return architecture(config).model.attention_core_flops(config, visible, layers)


def cache_bytes(config: ModelConfig, context: int, bytes_per_element: int = 2) -> int:
    """What a sequence of `context` tokens holds in the KV cache, all layers: its architecture's layout counts it
    (MLA: kv_lora_rank + qk_rope_head_dim, + V3.2's indexer key, per token; GQA: 2·G·d_h; V4: deepseek_v4/paged.py)."""
    return architecture(config).store.cache_bytes(config, context, bytes_per_element)


def long_context(
    config: ModelConfig, contexts: tuple[int, ...] = LONG_CONTEXTS, stats: ModelStats | None = None
) -> list[dict[str, float]]:
    """Per context length L: forward FLOPs of the token at position L (every activated matrix once, plus its
    attention over what it sees) and the cache bytes per token of an L-token sequence. What DeepSeek compares at
    1M tokens (V4-Flash: ~10 % of V3.2's FLOPs, ~7 % of its KV cache). `stats`: the model's, if already counted."""
    stats = stats or model_stats(config)
    matrices = 2 * stats.active_matrix_params
    return [
        {
            "context": L,
            "flops_per_token": matrices
            + float(attention_core_flops(config, torch.tensor([float(L)], dtype=torch.float64))[0]),
            "cache_bytes_per_token": cache_bytes(config, L) / L,
        }
        for L in contexts
    ]


@functools.cache
def preset_long_context(name: str) -> list[dict[str, float]]:
    """long_context of a preset, counted once per process (building V3's module tree, even on meta, takes a while)."""
    return long_context(preset(name))


def _elementwise(name: str, p: torch.Tensor) -> bool:
    """Parameters a token scales or shifts by rather than multiplies through: norms, V4's hyper-connection scales
    and biases, attention sinks, the compressors' position biases (added to the projected values)."""
    return p.dim() < 2 or name.endswith(".position_bias")


def model_stats(config: ModelConfig, seq_len: int | None = None, cache_bytes_per_element: int = 2) -> ModelStats:
    seq_len = seq_len or min(config.max_position_embeddings, 4096)
    with torch.device("meta"):
        model = build_model(config)
    components, mtp_components = dict.fromkeys(COMPONENTS, 0), dict.fromkeys(COMPONENTS, 0)
    elementwise = {"main": 0, "mtp": 0}
    for name, p in model.named_parameters():  # a tied head is listed once, under embed
        part = "mtp" if name.startswith("mtp.") else "main"
        elementwise[part] += p.numel() if _elementwise(name, p) else 0
        if part == "mtp":
            mtp_components[_component(name.split(".", 2)[2])] += p.numel()
        else:
            components[_component(name)] += p.numel()
    head_params = config.vocab_size * config.hidden_size
    active_fraction = config.active_expert_fraction

    def activated(parts: dict[str, int], heads: int = 1) -> dict[str, int]:
        """What a token computes with: the experts it picks, and the head (tied or not; MTP: once per depth), but
        not the embedding table, of which it reads one row. DeepSeek's '37B activated' (V3) and '2.4B' (V2-Lite)
        count this way."""
        return dict(
            parts,
            embedding=0,
            head=head_params * heads,
            routed_experts=round(parts["routed_experts"] * active_fraction),
        )

    active_components = activated(components)
    total, active = sum(components.values()), sum(active_components.values())
    mtp_unique = sum(mtp_components.values())
    visible = torch.arange(1, seq_len + 1, dtype=torch.float64)  # a causal sequence: token t sees t + 1

    def training_flops(parts: dict[str, int], elementwise_params: int, layers: int | None, heads: int) -> float:
        """3 × forward; forward = 2 FLOPs per multiply-add through every activated matrix (all but the
        elementwise parameters) plus the attention core, averaged over the sequence's positions."""
        core = float(attention_core_flops(config, visible, layers).mean())
        return 3 * (2 * (sum(activated(parts, heads).values()) - elementwise_params) + core)

    flops = training_flops(components, elementwise["main"], None, 1)
    # every MTP module's matrices once (mtp_components holds them all), the head and an attention core per depth
    depths = config.num_nextn_predict_layers
    mtp_flops = training_flops(mtp_components, elementwise["mtp"], depths, depths) if mtp_unique else 0.0
    layers, nbytes = config.num_hidden_layers, cache_bytes_per_element
    # the copies of the embedding and head a checkpoint stores for its MTP layers (V3: one each per layer; V4: none)
    stored_copies = len(architecture(config).checkpoint.shared_copies(config)) * head_params
    head_dim = config.baseline_head_dim  # the papers' MHA baseline
    mha = 2 * config.num_attention_heads * head_dim * layers * nbytes
    gqa = 2 * max(1, config.num_attention_heads // 8) * head_dim * layers * nbytes
    own = round(cache_bytes(config, seq_len, nbytes) / seq_len)  # V4's depends on the length (the window is bounded)
    return ModelStats(
        total_params=total,
        active_params=active,
        active_matrix_params=active - elementwise["main"],
        mtp_params=mtp_unique + stored_copies,
        mtp_unique_params=mtp_unique,
        components=components,
        active_components=active_components,
        seq_len=seq_len,
        flops_per_token=flops,
        mtp_flops_per_token=mtp_flops,
        kv_bytes_per_token=own,
        kv_bytes_per_token_mha=mha,
        kv_bytes_per_token_gqa=gqa,
        kv_cache_ratio=own / mha,
    )
