"""Which classes make up each architecture: the model, the layout of its cache (counted by `nanoseek info`, sized and
built by the serving engine) and the names of its tensors in checkpoint files (read and written by checkpoint/hf.py).
The trainer, the engine, the checkpoint code and the accounting ask here, by config.architecture, instead of
branching on a model's type; a new generation is one more entry."""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.config import ModelConfig
from nanoseek.models.common.checkpoint import CheckpointLayout
from nanoseek.models.common.paged import StoreLayout
from nanoseek.models.deepseek_v3.checkpoint import V3Checkpoint
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.deepseek_v3.paged import LatentLayout
from nanoseek.models.deepseek_v4.checkpoint import V4Checkpoint
from nanoseek.models.deepseek_v4.model import DeepseekV4Model
from nanoseek.models.deepseek_v4.paged import HybridLayout
from nanoseek.models.deepseek_v32.checkpoint import V32Checkpoint
from nanoseek.models.deepseek_v32.model import DeepseekV32Model
from nanoseek.models.llama.checkpoint import LlamaCheckpoint
from nanoseek.models.llama.model import GroupedLayout, LlamaModel


@dataclass(frozen=True)
class Architecture:
    model: type[DeepseekV3Model]
    store: StoreLayout
    checkpoint: CheckpointLayout


ARCHITECTURES: dict[str, Architecture] = {
    "deepseek_v3": Architecture(DeepseekV3Model, LatentLayout(), V3Checkpoint()),  # the V2 layout too
    "deepseek_v32": Architecture(DeepseekV32Model, LatentLayout(), V32Checkpoint()),
    "deepseek_v4": Architecture(DeepseekV4Model, HybridLayout(), V4Checkpoint()),
    "llama": Architecture(LlamaModel, GroupedLayout(), LlamaCheckpoint()),
}


def architecture(config: ModelConfig) -> Architecture:
    return ARCHITECTURES[config.architecture]


def build_model(config: ModelConfig) -> DeepseekV3Model:
    """The model this config describes, initialized (on the current default device: meta for accounting)."""
    return architecture(config).model(config)
