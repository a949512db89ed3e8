"""nanoseek: an open, efficient DeepSeek-V3-style LLM stack in PyTorch."""

from nanoseek.checkpoint.hf import load_pretrained, save_pretrained
from nanoseek.config import ModelConfig, RopeScaling
from nanoseek.errors import CheckpointError, ConfigError, NanoseekError
from nanoseek.model.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "RopeScaling", "Transformer", "ModelOutput", "load_pretrained", "save_pretrained",
           "NanoseekError", "ConfigError", "CheckpointError"]
