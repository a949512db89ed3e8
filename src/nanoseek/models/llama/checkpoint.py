"""The dense baseline in HF's Llama layout: V3's names for everything but attention (deepseek_v3/checkpoint.py),
whose q/k rows are reordered between DeepSeek's interleaved RoPE pairs and Llama's halves
(models/common/checkpoint.py)."""

from __future__ import annotations

from nanoseek.config import ModelConfig
from nanoseek.models.common.checkpoint import Entry
from nanoseek.models.deepseek_v3.checkpoint import V3Checkpoint

_ATTENTION = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "out_proj": "o_proj"}


class LlamaCheckpoint(V3Checkpoint):
    def attention_entries(self, config: ModelConfig, ours: str, hf: str) -> list[Entry]:
        return [
            Entry(
                f"{ours}.attn.{n}.weight",
                ((f"{hf}.self_attn.{theirs}.weight",),),
                rope_head_dim=config.head_dim if n in ("q_proj", "k_proj") else 0,
            )
            for n, theirs in _ATTENTION.items()
        ]
