"""One device → host copy per engine step: the step's results (sampled tokens, acceptance flags, logprobs,
drafts) are flattened into one tensor and read back by name, instead of by position in a flat list."""

from __future__ import annotations

import torch


class HostTransfer:
    """The step's results gathered by name into one device → host copy (a sync point), read back by name."""

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []
        self._sizes: dict[str, int] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        flat = values.float().flatten()
        self._parts.append(flat)
        self._sizes[name] = flat.numel()  # shape metadata: no device read

    def fetch(self) -> dict[str, list[float]]:
        host = torch.cat(self._parts).tolist() if self._parts else []
        named, at = {}, 0
        for name, size in self._sizes.items():
            named[name], at = host[at : at + size], at + size
        return named
