"""DeepSeek-V4 checkpoint names. transformers' `save_pretrained` writes V4 under DeepSeek's own names (it reverses
its conversion mapping) behind a `model.` prefix: `model.layers.N.attn.wq_a.weight`, experts one per key
(`ffn.experts.E.w1/w2/w3`), `head.weight`, `model.hc_head.hc_fn`. DeepSeek's release uses the same names without
the prefix (`layers.N.…`, `embed.weight`, `norm.weight`, `hc_head_fn`). Its MTP layers (`mtp.K.…`: a block's names
plus `e_proj`, `h_proj`, `enorm`, `hnorm`, `norm`, `hc_head_*`) we write as `model.mtp.K.…`, which transformers skips
on load. We write the former (`export --fp8`: the latter, quantized as released, checkpoint/fp8.py);
`release_aliases` lets the latter load too, `to_release_names` writes it."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from nanoseek.config import ModelConfig
from nanoseek.models.common.checkpoint import Entry
from nanoseek.models.deepseek_v4.config import CSA, SLIDING

# ours → DeepSeek's, within a block's attention and a compressor
_ATTENTION = {
    "q_down.weight": "wq_a.weight",
    "q_norm.weight": "q_norm.weight",
    "q_up.weight": "wq_b.weight",
    "kv_proj.weight": "wkv.weight",
    "kv_norm.weight": "norm.weight",
    "out_down": "wo_a.weight",
    "out_proj.weight": "wo_b.weight",
    "sinks": "attn_sink",
}
_COMPRESSOR = {
    "kv_proj.weight": "wkv.weight",
    "gate_proj.weight": "wgate.weight",
    "position_bias": "ape",
    "kv_norm.weight": "norm.weight",
}
_INDEXER = {"q_up.weight": "wq_b.weight", "head_weights.weight": "weights_proj.weight"}
_TOP_LEVEL = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}


def _plain(pairs: dict[str, str], ours: str, theirs: str) -> list[Entry]:
    return [Entry(f"{ours}.{a}", ((f"{theirs}.{b}",),)) for a, b in pairs.items()]


def _hyper(ours: str, theirs: str) -> list[Entry]:
    return [Entry(f"{ours}.{n}", ((f"{theirs}_{n}",),)) for n in ("fn", "base", "scale")]


def _block(config: ModelConfig, ours: str, theirs: str, layer_type: str, hashed: bool) -> list[Entry]:
    entries = _plain(_ATTENTION, f"{ours}.attn", f"{theirs}.attn")
    if layer_type != SLIDING:
        entries += _plain(_COMPRESSOR, f"{ours}.attn.compressor", f"{theirs}.attn.compressor")
    if layer_type == CSA:
        entries += _plain(_COMPRESSOR, f"{ours}.attn.indexer.compressor", f"{theirs}.attn.indexer.compressor")
        entries += _plain(_INDEXER, f"{ours}.attn.indexer", f"{theirs}.attn.indexer")
    entries += _hyper(f"{ours}.attn_hc", f"{theirs}.hc_attn") + _hyper(f"{ours}.mlp_hc", f"{theirs}.hc_ffn")
    entries += [
        Entry(f"{ours}.attn_norm.weight", ((f"{theirs}.attn_norm.weight",),)),
        Entry(f"{ours}.mlp_norm.weight", ((f"{theirs}.ffn_norm.weight",),)),
        Entry(f"{ours}.mlp.router.weight", ((f"{theirs}.ffn.gate.weight",),)),
    ]
    entries.append(
        Entry(
            f"{ours}.mlp.router.{'tid2eid' if hashed else 'expert_bias'}",
            ((f"{theirs}.ffn.gate.{'tid2eid' if hashed else 'bias'}",),),
        )
    )
    experts = [f"{theirs}.ffn.experts.{e}" for e in range(config.n_routed_experts)]
    entries += [
        Entry(f"{ours}.mlp.experts.gate_up", tuple((f"{e}.w1.weight", f"{e}.w3.weight") for e in experts), True),
        Entry(f"{ours}.mlp.experts.down", tuple((f"{e}.w2.weight",) for e in experts), True),
    ]
    if config.n_shared_experts:
        shared = f"{theirs}.ffn.shared_experts"
        entries += [
            Entry(f"{ours}.mlp.shared.gate_up.weight", ((f"{shared}.w1.weight", f"{shared}.w3.weight"),)),
            Entry(f"{ours}.mlp.shared.down.weight", ((f"{shared}.w2.weight",),)),
        ]
    return entries


def _entries(config: ModelConfig) -> list[Entry]:
    entries = [
        Entry("embed.weight", (("model.embed_tokens.weight",),)),
        Entry("norm.weight", (("model.norm.weight",),)),
        Entry("head.weight", (("model.embed_tokens.weight" if config.tie_word_embeddings else "head.weight",),)),
    ]
    entries += [Entry(f"hc_head.{n}", ((f"model.hc_head.hc_{n}",),)) for n in ("fn", "base", "scale")]
    for i in range(config.num_hidden_layers):
        entries += _block(
            config, f"layers.{i}", f"model.layers.{i}", config.layer_types[i], config.mlp_layer_types[i] == "hash_moe"
        )
    for k in range(config.num_nextn_predict_layers):
        ours, theirs = f"mtp.{k}", f"model.mtp.{k}"
        entries += [
            Entry(f"{ours}.{n}.weight", ((f"{theirs}.{n}.weight",),))
            for n in ("e_proj", "h_proj", "enorm", "hnorm", "norm")
        ]
        entries += [Entry(f"{ours}.hc_head.{n}", ((f"{theirs}.hc_head_{n}",),)) for n in ("fn", "base", "scale")]
        entries += _block(config, f"{ours}.block", theirs, SLIDING, False)
    return entries


def _from_release(key: str) -> str:
    # the attention's norm is `attn.kv_norm` in DeepSeek's files, `attn.norm` in transformers' save (which reverses
    # its own rename of `.norm.` to `.kv_norm.`, meant for the compressors' `norm`)
    prefix, dot, leaf = key.rpartition(".attn.kv_norm.")
    return f"model.{prefix}.attn.norm.{leaf}" if dot else f"model.{key}"


def release_aliases(keys: Iterable[str]) -> dict[str, str]:
    """DeepSeek's release names present in `keys` → the names V4Checkpoint.entries reads (empty for transformers'
    form)."""
    released = {theirs: ours for ours, theirs in _TOP_LEVEL.items()}
    return {
        key: released.get(key) or _from_release(key)
        for key in keys
        if key in released or key.startswith(("layers.", "mtp."))
    }


def to_release_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors under the names V4Checkpoint.entries gives → under DeepSeek's release names (release_aliases'
    inverse)."""
    top_level = dict(_TOP_LEVEL)
    out = {}
    for key, tensor in tensors.items():
        name = top_level.get(key) or key.removeprefix("model.")
        prefix, dot, leaf = name.rpartition(".attn.norm.")
        out[f"{prefix}.attn.kv_norm.{leaf}" if dot else name] = tensor
    return out


class V4Checkpoint:
    def entries(self, config: ModelConfig) -> list[Entry]:
        return _entries(config)

    def aliases(self, keys: Iterable[str]) -> dict[str, str]:
        return release_aliases(keys)

    def mtp_key(self, config: ModelConfig, depth: int) -> str:
        return f"model.mtp.{depth}.e_proj.weight"

    def written_not_read(self, key: str, config: ModelConfig) -> bool:
        """MTP layers beyond the ones the config asks for."""
        parts = key.split(".")
        return key.startswith("model.mtp.") and int(parts[2]) >= config.num_nextn_predict_layers

    def shared_copies(self, config: ModelConfig) -> dict[str, str]:
        return {}  # V4's MTP layers share the embedding and head without copies
