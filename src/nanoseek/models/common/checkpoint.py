"""How a generation's tensors are named in checkpoint files: each model folder's checkpoint.py lists, per nanoseek
tensor, the HF or DeepSeek tensors it is made of; checkpoint/hf.py reads and writes files from those lists alone."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from nanoseek.config import ModelConfig


@dataclass(frozen=True)
class Entry:
    """One nanoseek tensor and the HF tensors it is made of: `parts[e]` are the row blocks of slice e, concatenated
    along dim 0; several slices are stacked along a new dim 0 (the experts)."""

    ours: str
    parts: tuple[tuple[str, ...], ...]
    stacked: bool = False
    rope_head_dim: int = 0  # > 0: GQA q/k rows, reordered for Llama's RoPE layout (below)


class CheckpointLayout(Protocol):
    def entries(self, config: ModelConfig) -> list[Entry]:
        """Every tensor of the model built from `config`, and where it lives in the files."""

    def aliases(self, keys: Iterable[str]) -> dict[str, str]:
        """Another exporter's names among `keys` → the names `entries` reads (DeepSeek's release form)."""

    def mtp_key(self, config: ModelConfig, depth: int) -> str:
        """A tensor every MTP layer `depth` has: whether the files hold that layer."""

    def written_not_read(self, key: str, config: ModelConfig) -> bool:
        """A tensor the files may carry that the model does not read (copies, layers the config leaves out)."""

    def shared_copies(self, config: ModelConfig) -> dict[str, str]:
        """Tensors written again under other names (file name → our tensor): DeepSeek-V3 repeats the embedding and
        head in every MTP layer."""


# nanoseek rotates interleaved pairs (x0, x1), (x2, x3), ... of a head, as DeepSeek's weights expect; Llama rotates
# x_i with x_{i + d/2}. Storing each head's q/k projection rows as [even rows; odd rows] makes the two agree exactly
# (the same permutation Meta → HF conversions apply), so a saved baseline runs unchanged in transformers.
def interleaved_to_halves(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q/k projection rows, per head: nanoseek's pair order → Llama's [evens; odds]."""
    rows, cols = weight.shape
    return weight.view(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    rows, cols = weight.shape
    return weight.view(rows // head_dim, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)
