"""Which classes make up each architecture: the model, and the layout of its cache (counted by `nanoseek info`,
sized and built by the serving engine). The trainer, the engine, the checkpoint code and the accounting ask here,
by config.architecture, instead of branching on a model's type; a new generation is one more entry."""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.config import ModelConfig
from nanoseek.models.common.paged import StoreLayout
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.deepseek_v3.paged import LatentLayout
from nanoseek.models.deepseek_v4.model import DeepseekV4Model
from nanoseek.models.deepseek_v4.paged import HybridLayout
from nanoseek.models.deepseek_v32.model import DeepseekV32Model
from nanoseek.models.llama.model import GroupedLayout, LlamaModel


@dataclass(frozen=True)
class Architecture:
    model: type[DeepseekV3Model]
    store: StoreLayout


ARCHITECTURES: dict[str, Architecture] = {
    "deepseek_v3": Architecture(DeepseekV3Model, LatentLayout()),  # the V2 layout too (softmax routing)
    "deepseek_v32": Architecture(DeepseekV32Model, LatentLayout()),
    "deepseek_v4": Architecture(DeepseekV4Model, HybridLayout()),
    "llama": Architecture(LlamaModel, GroupedLayout()),
}


def architecture(config: ModelConfig) -> Architecture:
    return ARCHITECTURES[config.architecture]


def build_model(config: ModelConfig) -> DeepseekV3Model:
    """The model this config describes, initialized (on the current default device: meta for accounting)."""
    return architecture(config).model(config)
