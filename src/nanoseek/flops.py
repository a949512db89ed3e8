"""Model accounting: parameters (total, active, per component), training FLOPs per token, KV-cache bytes.

Counts come from the real module tree (built on the meta device, so the 671B shape costs no memory), so they
cannot drift from the code; FLOPs follow the usual 6·N (forward 2·N, backward 4·N) plus the attention core.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from nanoseek.config import ModelConfig
from nanoseek.model.transformer import Transformer

COMPONENTS = ("embedding", "attention", "dense_mlp", "router", "shared_experts", "routed_experts", "norms", "head")


def _component(name: str) -> str:
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("head."):
        return "head"
    if "norm" in name.rsplit(".", 2)[-2]:
        return "norms"
    if ".attn." in name:
        return "attention"
    for marker, component in ((".mlp.experts.", "routed_experts"), (".mlp.shared.", "shared_experts"),
                              (".mlp.router.", "router")):
        if marker in name:
            return component
    return "dense_mlp"


@dataclass(frozen=True)
class ModelStats:
    total_params: int  # main model (what "671B" counts), excluding MTP
    active_params: int  # per token: the picked experts and the head, not the embedding table
    mtp_params: int  # MTP modules as stored in a checkpoint (with their copies of embedding and head)
    mtp_unique_params: int  # MTP modules' own parameters
    components: dict[str, int]  # main-model parameters by component
    active_components: dict[str, int]
    seq_len: int
    flops_per_token: float  # training (forward + backward) FLOPs per token of the main model at seq_len
    mtp_flops_per_token: float  # the same for all MTP modules together
    kv_bytes_per_token: int  # this model's cache: MLA (kv_lora_rank + qk_rope_head_dim, + V3.2's index_head_dim) or
    # GQA 2·G·d_h, · layers
    kv_bytes_per_token_mha: int  # an MHA with the same heads: 2 · heads · d_h · layers · bytes
    kv_bytes_per_token_gqa: int  # a GQA with the same heads in groups of 8 (Llama 3's 64/8): 2 · heads/8 · d_h · ...
    kv_cache_ratio: float  # this model / MHA

    def to_dict(self) -> dict:
        return asdict(self)


def _attention_core_flops(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token per layer of QKᵀ and AV, averaged over a causal sequence of seq_len. V3.2: a query
    attends to at most index_topk keys, and its indexer scores every earlier key (a dot per indexer head, then the
    weighted sum over heads)."""
    keys_visible = (seq_len + 1) / 2
    keys_attended = keys_visible
    if config.sparse_attention and seq_len > config.index_topk:
        k = config.index_topk
        keys_attended = (k * (k + 1) / 2 + (seq_len - k) * k) / seq_len
    core = 2 * config.num_attention_heads * (config.qk_head_dim + config.attention_v_dim) * keys_attended
    if config.sparse_attention:
        core += 2 * config.index_n_heads * (config.index_head_dim + 1) * keys_visible
    return core


def model_stats(config: ModelConfig, seq_len: int | None = None, cache_bytes_per_element: int = 2) -> ModelStats:
    seq_len = seq_len or min(config.max_position_embeddings, 4096)
    with torch.device("meta"):
        model = Transformer(config)
    components, mtp_components = dict.fromkeys(COMPONENTS, 0), dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # a tied head is listed once, under embed
        if name.startswith("mtp."):
            mtp_components[_component(name.split(".", 2)[2])] += p.numel()
        else:
            components[_component(name)] += p.numel()
    head_params = config.vocab_size * config.hidden_size
    active_fraction = config.num_experts_per_tok / config.n_routed_experts

    def activated(parts: dict[str, int]) -> dict[str, int]:
        """What a token computes with: the experts it picks, and the head (tied or not), but not the embedding
        table, of which it reads one row. DeepSeek's '37B activated' (V3) and '2.4B' (V2-Lite) count this way."""
        return dict(parts, embedding=0, head=head_params,
                    routed_experts=round(parts["routed_experts"] * active_fraction))

    active_components = activated(components)
    total, active = sum(components.values()), sum(active_components.values())
    mtp_unique = sum(mtp_components.values())
    attention_core = _attention_core_flops(config, seq_len)

    def training_flops(parts: dict[str, int], layers: int) -> float:
        """3 × forward; forward = 2 FLOPs per multiply-add through every activated matrix (all but the
        elementwise norms) plus the attention core."""
        active_parts = activated(parts)
        return 3 * (2 * (sum(active_parts.values()) - active_parts["norms"]) + layers * attention_core)

    flops = training_flops(components, config.num_hidden_layers)
    mtp_flops = training_flops(mtp_components, 1) * config.num_nextn_predict_layers if mtp_unique else 0.0
    layers, nbytes = config.num_hidden_layers, cache_bytes_per_element
    # The papers' MHA baseline for MLA: per-head dimension d_h = qk_nope_head_dim (128 at V2/V3 shape).
    head_dim = config.qk_nope_head_dim if config.attention_type == "mla" else config.head_dim
    mha = 2 * config.num_attention_heads * head_dim * layers * nbytes
    gqa = 2 * max(1, config.num_attention_heads // 8) * head_dim * layers * nbytes
    if config.attention_type == "mla":
        own = config.cache_width * layers * nbytes
    else:
        own = 2 * config.num_key_value_heads * head_dim * layers * nbytes
    return ModelStats(
        total_params=total, active_params=active,
        mtp_params=mtp_unique + 2 * head_params * config.num_nextn_predict_layers, mtp_unique_params=mtp_unique,
        components=components, active_components=active_components, seq_len=seq_len,
        flops_per_token=flops, mtp_flops_per_token=mtp_flops,
        kv_bytes_per_token=own, kv_bytes_per_token_mha=mha, kv_bytes_per_token_gqa=gqa, kv_cache_ratio=own / mha)
