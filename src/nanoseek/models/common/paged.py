"""What an inference forward over a paged latent store needs to know. The serving engine builds it; the model only
reads it, so the model never depends on how blocks are allocated, shared or evicted.

A layer's store holds, per slot (one token of one sequence), MLA's [c_KV; k_rope] and, for V3.2, the lightning
indexer's key in a tensor of its own: the indexer reads the keys of a whole context every decode step, and from a
separate tensor those are contiguous rows, not a strided slice of wider ones. A forward gets, per sequence, the
slots of its context in position order (its block table unrolled), and the slot each new token is written to.

The N tokens of a forward lie flat: first the decode sequences, `decode_width` tokens each (1, or 1 + the draft
when speculation verifies one), then the prefill chunks one after another. Decode rows attend in the absorbed
form over the latents; prefill chunks up-project their context to per-head keys and values and run SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from nanoseek.config import ModelConfig


@dataclass
class PagedStore:
    latents: torch.Tensor  # [slots, kv_lora_rank + rope] (with a leading [layers + MTP modules] dim: every layer's)
    index_keys: torch.Tensor | None = None  # [slots, index_head_dim] likewise (V3.2)

    def layer(self, i: int) -> PagedStore:
        return PagedStore(self.latents[i], None if self.index_keys is None else self.index_keys[i])

    @property
    def dtype(self) -> torch.dtype:
        return self.latents.dtype

    @property
    def device(self) -> torch.device:
        return self.latents.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.latents, self.index_keys) if t is not None)

    def block_count(self, block_size: int) -> int:
        return self.latents.shape[1] // block_size


class StoreLayout(Protocol):
    """How a generation caches what its attention keeps of a sequence: counted (`nanoseek info`), and sized and
    built for the serving engine. The registry (models/registry.py) names one per architecture."""

    keeps_state: ClassVar[
        bool
    ]  # part of a sequence lives outside its blocks (a state slot): prefix hits need snapshots
    drafts: ClassVar[bool]  # the engine can verify MTP drafts in it (a rejected draft leaves nothing behind)

    def cache_bytes(self, config: ModelConfig, context: int, bytes_per_element: int = 2) -> int:
        """What a sequence of `context` tokens holds in the cache, all layers (MTP modules not counted)."""

    def serving_bytes(self, config: ModelConfig, context: int, element_size: int) -> int:
        """What the engine's store holds for one sequence of `context` tokens (MTP modules included)."""

    def state_bytes(self, config: ModelConfig, element_size: int) -> int:
        """One state slot's bytes (0 without keeps_state)."""

    def build(
        self,
        model: nn.Module,
        memory_bytes: int,
        block_size: int,
        states: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> Any:
        """The engine's store: `states` state slots (with keeps_state), then as many blocks as the memory holds.
        It has .nbytes, .device and .block_count(block_size)."""


@dataclass
class PrefillChunk:
    start: int  # index of the chunk's first token among the forward's N tokens
    length: int
    context: torch.Tensor  # [ctx] slots of positions 0..ctx-1: cached prefix, earlier chunks, this chunk (V4: none)

    def visible(self) -> torch.Tensor:
        """[length, ctx] bool: the chunk's token i (at position ctx - length + i) sees positions up to its own."""
        ctx = self.context.shape[0]
        first = ctx - self.length
        keys = torch.arange(ctx, device=self.context.device)
        return keys <= torch.arange(first, ctx, device=self.context.device)[:, None]


@dataclass
class Segment:
    """DeepSeek-V4 (models/deepseek_v4/paged.py): one sequence's tokens in a forward's flat batch, start..start+length-1
    at positions position.., its state slot and its block table."""

    start: int
    length: int
    position: int
    state: int
    table: torch.Tensor  # [blocks] block ids


@dataclass
class SingleRows:
    """The one-token segments of a V4 forward (its decode rows) as tensors, built once for every layer."""

    rows: torch.Tensor  # [R] where their tokens sit among the forward's N
    positions: torch.Tensor  # [R]
    states: torch.Tensor  # [R] state slots
    tables: torch.Tensor  # [R, blocks] block tables, padded with block 0
    last_position: int  # the largest of positions, known on the host (no device sync to size the entries)


@dataclass
class PagedBatch:
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] the store slot each token's latent is written to (V4: none, its segments say)
    decode_rows: int = 0
    decode_width: int = 1
    decode_context: torch.Tensor | None = None  # [rows, S] slots of each decode sequence's context, padded
    prefills: list[PrefillChunk] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)  # V4: every sequence's tokens (decode rows, then chunks)

    @property
    def decode_tokens(self) -> int:
        return self.decode_rows * self.decode_width

    @cached_property
    def single_rows(self) -> SingleRows | None:
        single = [seg for seg in self.segments if seg.length == 1]
        if not single:
            return None
        device = self.positions.device

        def column(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, device=device)

        return SingleRows(
            column([s.start for s in single]),
            column([s.position for s in single]),
            column([s.state for s in single]),
            torch.nn.utils.rnn.pad_sequence([s.table for s in single], batch_first=True),
            max(s.position for s in single),
        )

    def decode_visible(self) -> torch.Tensor:
        """[rows, width, 1, S] bool: context index = position, so a query sees indices up to its own position (the
        padding of shorter contexts lies beyond every one of their positions)."""
        span = self.decode_context.shape[1]
        own = self.positions[: self.decode_tokens].view(self.decode_rows, self.decode_width, 1, 1)
        return torch.arange(span, device=own.device) <= own
