"""A checkpoint tensor's name in nanoseek and the HF tensors it is made of."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One nanoseek tensor and the HF tensors it is made of: `parts[e]` are the row blocks of slice e, concatenated
    along dim 0; several slices are stacked along a new dim 0 (the experts)."""

    ours: str
    parts: tuple[tuple[str, ...], ...]
    stacked: bool = False
    rope_head_dim: int = 0  # > 0: GQA q/k rows, reordered for Llama's RoPE layout (nanoseek.llama)
