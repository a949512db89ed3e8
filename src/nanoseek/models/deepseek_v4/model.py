"""The DeepSeek-V4 decoder, as the diff of V3's (deepseek_v3/model.py): the residual is hc_mult streams that every
block reads and writes through its hyper-connections (hyper.py), attention is sliding, CSA or HCA per layer
(attention.py) with a second RoPE for the compressed layers, the first layers route by token hash, and the streams
collapse into one (hc_head) before the final norm; MTP depths are V4 blocks of their own."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.models.common.paged import PagedBatch
from nanoseek.models.common.rope import RotaryEmbedding
from nanoseek.models.common.terms import ForwardTerms
from nanoseek.models.deepseek_v3.model import DeepseekV3Model, ModelOutput
from nanoseek.models.deepseek_v4.attention import AttentionCache
from nanoseek.models.deepseek_v4.compressor import CompressedIndexer
from nanoseek.models.deepseek_v4.config import CSA, HCA, SLIDING
from nanoseek.models.deepseek_v4.hyper import HyperBlock, HyperHead, HyperMTP
from nanoseek.models.deepseek_v4.paged import HybridStore


@dataclass
class HybridCache:
    """Every layer's AttentionCache of a batch of sequences of equal length (DeepSeek-V4's forward_cached)."""

    length: int = 0
    layers: list[AttentionCache] = field(default_factory=list)


class DeepseekV4Model(DeepseekV3Model):
    architectures = ("deepseek_v4",)
    takes_document_mask = False  # a compressed entry would pool tokens of two documents
    pipeline_refusal = (
        "V4 is not pipelined: its residual streams and the token ids its hash-routed layers need do not cross "
        "stages; train it without --pp"
    )

    def block(self, config: ModelConfig, layer_index: int) -> nn.Module:
        return HyperBlock(config, layer_index)

    @staticmethod
    def attention_core_flops(config: ModelConfig, visible: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """Per layer by its type: the sliding window, plus the compressed entries of closed windows (HCA all, CSA
        at most index_topk, its indexer scoring each); one shared key/value head of head_dim. MTP layers slide."""
        indexer = 2 * config.index_n_heads * (config.index_head_dim + 1)

        def layer(layer_type: str) -> torch.Tensor:
            keys, core = visible.clamp(max=config.sliding_window), torch.zeros_like(visible)
            if layer_type in (CSA, HCA):
                rate = config.compress_rate_csa if layer_type == CSA else config.compress_rate_hca
                entries = torch.floor(visible / rate)
                keys = keys + (entries.clamp(max=config.index_topk) if layer_type == CSA else entries)
                core = indexer * entries if layer_type == CSA else core
            return core + 2 * config.num_attention_heads * 2 * config.head_dim * keys

        return sum(map(layer, config.layer_types)) if layers is None else layers * layer(SLIDING)

    def mtp_module(self, config: ModelConfig, layer_index: int) -> nn.Module:
        return HyperMTP(config, layer_index)

    def add_modules(self, config: ModelConfig) -> None:
        """The compressed layers' RoPE (its own base and YaRN), and the final collapse of the residual streams."""
        self.compress_rope = RotaryEmbedding(config, "compress")
        self.hc_head = HyperHead(config)

    def reset_buffers(self) -> None:
        super().reset_buffers()
        self.compress_rope.reset_parameters()

    def indexers(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, CompressedIndexer)]

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        with_mtp: bool = True,
        documents: torch.Tensor | None = None,
        terms: ForwardTerms | None = None,
    ) -> torch.Tensor | ModelOutput:
        if documents is not None:  # a compressed entry would pool tokens of two documents
            raise ValueError("DeepSeek-V4 models take no document mask (set train.document_mask false)")
        return super().forward(input_ids, targets, with_mtp, terms=terms)

    def hidden_states(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        input_ids: torch.Tensor,
        documents: torch.Tensor | None,
        terms: ForwardTerms,
    ) -> tuple[torch.Tensor, tuple]:
        """→ the residual streams [B, T, n, dim] (MTP reads the streams, not their collapse), and (ropes,
        positions) for MTP's blocks."""
        return self._hyper_layers(x, positions, input_ids, terms=terms), (self._ropes(), positions)

    def collapse(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hc_head(hidden)

    def mtp_depth(
        self, module: nn.Module, hidden: torch.Tensor, next_ids: torch.Tensor, position_args: tuple, terms: ForwardTerms
    ) -> torch.Tensor:
        ropes, positions = position_args
        return module(hidden, self.embed(next_ids), ropes, positions[: hidden.shape[1]], next_ids, terms=terms)

    def mtp_forward_paged(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, batch: PagedBatch, stores: HybridStore, depth: int = 0
    ) -> torch.Tensor:
        """Refused rather than run with V3's arguments: V4's store holds no MTP layer, and a rejected draft would
        stay in the windows and open compressor windows (HybridLayout.drafts is False; the engine serves V4 without
        speculation)."""
        raise NotImplementedError("V4's MTP drafts are not served: its store keeps no state for rejected drafts")

    def _ropes(self) -> dict[str, nn.Module]:
        """V4's two RoPEs: "main" (sliding layers) and "compress" (compressed layers)."""
        return {"main": self.rope, "compress": self.compress_rope}

    def _hyper_layers(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        input_ids: torch.Tensor,
        caches: list[AttentionCache] | None = None,
        paged: tuple[HybridStore, PagedBatch] | None = None,
        terms: ForwardTerms | None = None,
    ) -> torch.Tensor:
        """The embedding [B, T, dim] copied into hc_mult streams, through every block → [B, T, n, dim]."""
        ropes = self._ropes()
        streams = x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1)
        for i, layer in enumerate(self.layers):
            streams = layer(
                streams,
                ropes,
                positions,
                input_ids,
                None if caches is None else caches[i],
                None if paged is None else (paged[0].layer(i), paged[1]),
                terms,
            )
        return streams

    def forward_cached(self, input_ids: torch.Tensor, cache: HybridCache) -> torch.Tensor:
        """Inference without the engine: input_ids [B, T], the tokens after `cache` (rows of equal length) → logits
        [B, T, vocab]; the cache then holds them too."""
        T = input_ids.shape[1]
        positions = torch.arange(cache.length, cache.length + T, device=input_ids.device)
        x = self.embed(input_ids)
        if not cache.layers:
            cache.layers = [layer.attn.empty_cache(x) for layer in self.layers]
        streams = self._hyper_layers(x, positions, input_ids, cache.layers)
        cache.length += T
        return self.logits(streams)

    def forward_paged(self, input_ids: torch.Tensor, batch: PagedBatch, stores: HybridStore) -> torch.Tensor:
        """The engine's forward (V3's) over V4's store and the batch's segments (deepseek_v4/paged.py): the hidden
        states are the residual streams [N, n, dim]."""
        return self._hyper_layers(self.embed(input_ids)[None], batch.positions, input_ids[None], paged=(stores, batch))[
            0
        ]
