"""DeepSeek-V3.2's checkpoint names: V3's (deepseek_v3/checkpoint.py), and each attention's lightning indexer under
`self_attn.indexer` (transformers' and DeepSeek's release names)."""

from __future__ import annotations

from nanoseek.config import ModelConfig
from nanoseek.models.common.checkpoint import Entry
from nanoseek.models.deepseek_v3.checkpoint import V3Checkpoint

_INDEXER = {
    "q_up.weight": "wq_b.weight",
    "k_proj.weight": "wk.weight",
    "k_norm.weight": "k_norm.weight",
    "k_norm.bias": "k_norm.bias",
    "head_weights.weight": "weights_proj.weight",
}


class V32Checkpoint(V3Checkpoint):
    def attention_entries(self, config: ModelConfig, ours: str, hf: str) -> list[Entry]:
        indexer = [Entry(f"{ours}.attn.indexer.{n}", ((f"{hf}.self_attn.indexer.{_INDEXER[n]}",),)) for n in _INDEXER]
        return super().attention_entries(config, ours, hf) + indexer
