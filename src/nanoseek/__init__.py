"""nanoseek: DeepSeek-V3, V3.2 and V4 in PyTorch: pretrain, fine-tune, evaluate, serve.

The names below load on first use, so that a part that needs no model (the data tools, and the processes that
encode a corpus in parallel) starts without importing torch."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ModelConfig": "nanoseek.config",
    "RopeScaling": "nanoseek.config",
    "preset": "nanoseek.presets",
    "build_model": "nanoseek.models.registry",
    "DeepseekV3Model": "nanoseek.models.deepseek_v3.model",
    "ModelOutput": "nanoseek.models.deepseek_v3.model",
    "load_pretrained": "nanoseek.checkpoint.hf",
    "save_pretrained": "nanoseek.checkpoint.hf",
    "NanoseekError": "nanoseek.errors",
    "ConfigError": "nanoseek.errors",
    "CheckpointError": "nanoseek.errors",
}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
