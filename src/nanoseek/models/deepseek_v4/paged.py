"""DeepSeek-V4's serving cache: what grows in pages, what is bounded in one slot per running sequence.

Per layer, the compressed entries (CSA: with the indexer's compressed keys) live in the blocks of the sequence's
block table, the same tables the engine gives MLA's latents: block j of a sequence holds the entries of the windows
that close inside its tokens (block_size / rate of them, or one when a window spans blocks). Per running sequence,
a state slot holds what is bounded: the keys of the last sliding_window - 1 tokens (a ring indexed by position),
the compressors' open window (projected values and gates, a ring indexed by position within the window) and, for
CSA, the previous window's first series. A forward loads a sequence's AttentionCache from these, runs the layer's
one code path (models/deepseek_v4/attention.py), and writes back what changed. Further state slots hold snapshots of a
sequence's state at a block boundary: with the blocks before it, a prefix cache hit resumes from one.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.models.common.paged import PagedBatch, Segment, SingleRows
from nanoseek.models.common.rope import apply_rope_trailing
from nanoseek.models.deepseek_v3.attention import gather
from nanoseek.models.deepseek_v4.attention import AttentionCache, HybridAttention
from nanoseek.models.deepseek_v4.compressor import Compressor, CompressorState
from nanoseek.models.deepseek_v4.config import CSA, HCA
from nanoseek.models.deepseek_v32.indexer import head_weights, index_scores


def entries_per_block(rate: int, block_size: int) -> int:
    if block_size % rate and rate % block_size:
        raise ValueError(f"the block size ({block_size}) and the compression rate ({rate}) must divide one another")
    return max(1, block_size // rate)


class CompressorStore:
    """One compressor's paged entries and per-sequence open window."""

    def __init__(
        self,
        compressor: Compressor,
        blocks: int,
        block_size: int,
        states: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.rate, self.overlap, self.block_size = compressor.rate, compressor.overlap, block_size
        self.per_block = entries_per_block(self.rate, block_size)
        width, d = compressor.kv_proj.out_features, compressor.head_dim

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        self.entries = zeros(blocks * self.per_block, d)
        self.pending = zeros(states, self.rate, width), zeros(states, self.rate, width)
        self.previous = (zeros(states, self.rate, d), zeros(states, self.rate, d)) if self.overlap else None

    def tensors(self) -> list[torch.Tensor]:
        return [self.entries, *self.state_tensors()]

    def state_tensors(self) -> list[torch.Tensor]:
        """What a sequence's state slot holds (first dim: the slot): its open window, CSA's previous window."""
        return [*self.pending, *(self.previous or ())]

    def slots_of(self, tables: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Where entries `windows` [R, K] of the sequences with block tables [R, blocks] live → [R, K]."""
        block = ((windows + 1) * self.rate - 1) // self.block_size
        return tables.gather(1, block) * self.per_block + windows % self.per_block

    def entry_slots(self, table: torch.Tensor, first: int, stop: int) -> torch.Tensor:
        """Where entries first..stop-1 of a sequence with this block table live."""
        return self.slots_of(table[None], torch.arange(first, stop, device=table.device)[None])[0]

    def load(self, seg: Segment) -> CompressorState:
        p, state = seg.position, seg.state
        ring = torch.arange(p - p % self.rate, p, device=self.entries.device) % self.rate
        pending = (self.pending[0][state, ring][None], self.pending[1][state, ring][None])
        closed = p // self.rate
        previous = None
        if self.previous is not None and closed:
            previous = self.previous[0][state][None], self.previous[1][state][None]
        return CompressorState(pending, previous, gather(self.entries, self.entry_slots(seg.table, 0, closed))[None])

    def advance(self, compressor: Compressor, x: torch.Tensor, rope: nn.Module, rows: SingleRows) -> None:
        """Decode rows x [R, 1, dim] (one token each, their own sequences): each token's values and gate into its
        open window; the rows whose window it closes pool it into a new entry (CSA: with the window before)."""
        positions, states = rows.positions, rows.states
        slot = positions % self.rate
        kv, gate = compressor.project(x)
        self.pending[0][states, slot], self.pending[1][states, slot] = kv[:, 0], gate[:, 0]
        closing = ((positions + 1) % self.rate == 0).nonzero().flatten()
        if closing.numel():
            held = states[closing]
            kv, gate = self.pending[0][held], self.pending[1][held] + compressor.position_bias
            previous = None
            if self.previous is not None:  # a sequence's first window has none: weighed 0 by a -inf gate
                first = (positions[closing] < self.rate).view(-1, 1, 1)
                previous = (self.previous[0][held], self.previous[1][held].masked_fill(first, -torch.inf))
                d = compressor.head_dim
                # the gate carries the fp32 position bias (KeepsDtype): stored in the cache's dtype, as a chunk's is
                self.previous[0][held], self.previous[1][held] = kv[..., :d], gate[..., :d].to(self.previous[1].dtype)
            pooled = compressor.kv_norm(compressor.pool(kv[:, None], gate[:, None], previous))  # [C, 1, d]
            window = positions[closing] // self.rate
            cos, sin = rope(window * self.rate)
            entry = apply_rope_trailing(pooled[:, None], cos[:, None], sin[:, None])[:, 0, 0]
            self.entries[self.slots_of(rows.tables[closing], window[:, None])[:, 0]] = entry

    def closed(self, rows: SingleRows) -> tuple[torch.Tensor, torch.Tensor]:
        """Every decode row's closed entries (after `advance`): their slots [R, N] (padded to the longest row) and
        which are real [R, N]. The CSA compressor and its indexer's share them (same rate, same blocks)."""
        windows = torch.arange((rows.last_position + 1) // self.rate, device=rows.positions.device)
        real = windows < ((rows.positions + 1) // self.rate)[:, None]
        return self.slots_of(rows.tables, windows.expand(len(rows.positions), -1)), real

    def save(self, seg: Segment, state: CompressorState) -> None:
        end = seg.position + seg.length
        held = state.pending[0].shape[1]
        ring = torch.arange(end - held, end, device=self.entries.device) % self.rate
        self.pending[0][seg.state, ring] = state.pending[0][0]
        self.pending[1][seg.state, ring] = state.pending[1][0]
        if self.previous is not None and state.previous is not None:
            self.previous[0][seg.state] = state.previous[0][0]
            self.previous[1][seg.state] = state.previous[1][0]
        before = seg.position // self.rate
        total = state.entries.shape[1]
        if total > before:
            self.entries[self.entry_slots(seg.table, before, total)] = state.entries[0, before:]


class LayerStore:
    """A V4 layer's store: the window ring and its compressors' stores."""

    def __init__(
        self, attn: HybridAttention, blocks: int, block_size: int, states: int, device: torch.device, dtype: torch.dtype
    ):
        self.window = attn.window
        self.keys = torch.zeros(states, max(1, self.window - 1), attn.head_dim, device=device, dtype=dtype)
        make = lambda c: CompressorStore(c, blocks, block_size, states, device, dtype)  # noqa: E731
        self.compressor = make(attn.compressor) if attn.compressor is not None else None
        self.indexer = make(attn.indexer.compressor) if attn.indexer is not None else None

    def tensors(self) -> list[torch.Tensor]:
        return [c.entries for c in (self.compressor, self.indexer) if c is not None] + self.state_tensors()

    def state_tensors(self) -> list[torch.Tensor]:
        """What a state slot holds (first dim: the slot): the window ring and the compressors' open windows."""
        return [self.keys] + [t for c in (self.compressor, self.indexer) if c is not None for t in c.state_tensors()]

    def copy_state(self, source: int, target: int) -> None:
        """State slot `source` into slot `target` (the rings stay indexed by position)."""
        for t in self.state_tensors():
            t[target] = t[source]

    def load(self, seg: Segment) -> AttentionCache:
        ring_size = self.keys.shape[1]
        positions = torch.arange(max(0, seg.position - ring_size), seg.position, device=self.keys.device)
        return AttentionCache(
            self.keys[seg.state, positions % ring_size][None],
            positions,
            self.compressor.load(seg) if self.compressor else None,
            self.indexer.load(seg) if self.indexer else None,
        )

    def save(self, seg: Segment, cache: AttentionCache) -> None:
        ring_size = self.keys.shape[1]
        self.keys[seg.state, cache.key_positions % ring_size] = cache.keys[0]
        for store, state in ((self.compressor, cache.compressor), (self.indexer, cache.indexer)):
            if store is not None and state is not None:
                store.save(seg, state)


class HybridStore:
    """Every V4 layer's LayerStore: what the engine allocates instead of MLA's latent store."""

    def __init__(
        self,
        layers: list[nn.Module],
        blocks: int,
        block_size: int,
        states: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.layers = [LayerStore(layer.attn, blocks, block_size, states, device, dtype) for layer in layers]
        self.blocks, self.block_size = blocks, block_size
        self.device, self.dtype = device, dtype

    def layer(self, i: int) -> LayerStore:
        return self.layers[i]

    def copy_state(self, source: int, target: int) -> None:
        """A sequence's bounded state, every layer: into a snapshot for the prefix cache, or back out of one."""
        for layer in self.layers:
            layer.copy_state(source, target)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def block_count(self, block_size: int) -> int:
        return self.blocks


class HybridLayout:
    keeps_state: ClassVar[bool] = True
    drafts: ClassVar[bool] = False  # a rejected draft would stay in the window and the open compressor windows

    def cache_bytes(self, config: ModelConfig, context: int, bytes_per_element: int = 2) -> int:
        """The sliding window's keys (at most sliding_window tokens), the compressed entries of closed windows (CSA:
        with the indexer's compressed keys), and the compressors' open window: each token's projected values and
        gates until its window closes (CSA: two series, and the previous window's first series, for the overlap)."""
        total, d, i = 0, config.head_dim, config.index_head_dim
        for layer_type in config.layer_types:
            total += min(context, config.sliding_window) * d
            if layer_type == HCA:
                rate = config.compress_rate_hca
                total += context // rate * d + 2 * rate * d
            elif layer_type == CSA:
                rate = config.compress_rate_csa
                total += context // rate * (d + i) + 2 * rate * (2 * d + 2 * i) + 2 * rate * (d + i)
        return total * bytes_per_element

    def serving_bytes(self, config: ModelConfig, context: int, element_size: int) -> int:
        return self.cache_bytes(config, context, element_size)

    def state_bytes(self, config: ModelConfig, element_size: int) -> int:
        """About the cache of a window-long sequence."""
        return self.cache_bytes(config, config.sliding_window, element_size)

    def build(
        self,
        model: nn.Module,
        memory_bytes: int,
        block_size: int,
        states: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> HybridStore:
        """`states` state slots (windows, open compressor windows: one per running sequence, and the prefix cache's
        snapshots), then as many blocks of compressed entries as the rest of the memory holds."""

        def sized(blocks: int) -> HybridStore:
            return HybridStore(list(model.layers), blocks, block_size, states, device, dtype)

        state_bytes = sized(0).nbytes
        block_bytes = sized(1).nbytes - state_bytes
        blocks = (memory_bytes - state_bytes) // max(1, block_bytes)
        if blocks < 1:
            raise ValueError(
                f"the cache memory ({memory_bytes} bytes) holds {states} sequence states "
                f"({state_bytes} bytes) and no block of {block_size} tokens ({block_bytes} bytes)"
            )
        return sized(blocks)


def decode_rows(
    attn: HybridAttention, x: torch.Tensor, ropes: dict[str, nn.Module], store: LayerStore, rows: SingleRows
) -> torch.Tensor:
    """x [R, 1, dim]: one new token per sequence, all at once → [R, 1, dim]. The same attention as the layer's
    forward over its cache, padded across sequences: the window's ring (a key at ring index j holds the latest
    position ≡ j), every closed entry (CSA: only the indexer's top-k of them are gathered), the token itself."""
    device, positions, states = x.device, rows.positions, rows.states
    cos, sin = ropes[attn.rope_kind](positions)
    rope = cos[:, None], sin[:, None]  # [R, 1, r/2]: per row
    q, q_latent = attn.queries(x, rope)
    kv = attn.key_values(x, rope)  # [R, 1, D]
    ring = store.keys.shape[1]
    held = (positions[:, None] - 1) - ((positions[:, None] - 1 - torch.arange(ring, device=device)) % ring)
    keys = torch.cat([store.keys.index_select(0, states), kv], dim=1)
    visible = torch.cat([held >= 0, torch.ones_like(held[:, :1], dtype=torch.bool)], dim=1)
    store.keys[states, positions % ring] = kv[:, 0]
    if attn.compressor is not None and store.compressor is not None:
        store.compressor.advance(attn.compressor, x, ropes["compress"], rows)
        slots, readable = store.compressor.closed(rows)
        if attn.indexer is not None and store.indexer is not None:
            store.indexer.advance(attn.indexer.compressor, x, ropes["compress"], rows)
            scores = index_scores(
                attn.indexer.queries(q_latent, *rope),
                head_weights(attn.indexer.head_weights, x),
                gather(store.indexer.entries, slots),
            )[:, 0]
            # only the top-k entries are gathered: attention's cost stays index_topk however long the context
            picked = (
                scores.masked_fill(~readable, -torch.inf)
                .topk(min(attn.indexer.topk, scores.shape[-1]), sorted=False)
                .indices
            )  # order: immaterial
            slots, readable = slots.gather(1, picked), readable.gather(1, picked)
        keys = torch.cat([keys, gather(store.compressor.entries, slots)], dim=1)
        visible = torch.cat([visible, readable], dim=1)
    attended, _ = attn.attend(q, keys, visible[:, None, None])
    return attn.output(attended, rope)


def forward_segments(
    attn: HybridAttention, x: torch.Tensor, ropes: dict[str, nn.Module], store: LayerStore, batch: PagedBatch
) -> torch.Tensor:
    """x [1, N, dim], the flat tokens of every segment → [1, N, dim]: the one-token segments (decode rows) all at
    once, then each longer prompt chunk through the layer's forward with its cache loaded from the store, which
    then takes back what changed."""
    out = torch.empty_like(x)
    single = batch.single_rows
    if single is not None:
        out[0, single.rows] = decode_rows(attn, x[0, single.rows, None], ropes, store, single)[:, 0]
    for seg in batch.segments:
        if seg.length == 1:
            continue
        cache = store.load(seg)
        positions = torch.arange(seg.position, seg.position + seg.length, device=x.device)
        out[:, seg.start : seg.start + seg.length] = attn(
            x[:, seg.start : seg.start + seg.length], ropes, positions, cache
        )
        store.save(seg, cache)
    return out
