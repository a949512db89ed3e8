"""The DeepSeek-V3 decoder: embedding → blocks (dense MLP for the first layers, then MoE) → norm → head, plus the
multi-token-prediction modules that train on (and can draft) the tokens after next. The base of every generation:
V3.2 (deepseek_v32/model.py) changes its attention, the dense baseline (llama/model.py) too, and V4
(deepseek_v4/model.py) its blocks, MTP and residual."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.models.common.init import seeded_normal_
from nanoseek.models.common.layers import MLP, RMSNorm
from nanoseek.models.common.loss import linear_cross_entropy
from nanoseek.models.common.moe import HashRouter, MoE, Router
from nanoseek.models.common.paged import PagedBatch, PagedStore
from nanoseek.models.common.rope import RotaryEmbedding
from nanoseek.models.common.terms import ForwardTerms
from nanoseek.models.deepseek_v3.attention import MultiHeadLatentAttention


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, attention: type[nn.Module]):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.routed = config.is_moe_layer(layer_index)
        self.mlp: MLP | MoE = MoE(config) if self.routed else MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        paged: tuple[PagedStore, PagedBatch] | None = None,
        mask: torch.Tensor | None = None,
        terms: ForwardTerms | None = None,
    ) -> torch.Tensor:
        """Whole causal sequences (training; `mask` keeps packed documents apart; `terms` collects the auxiliary
        losses); with `paged` (this layer's latent store, the batch layout), the flat new tokens of an inference
        forward."""
        normed = self.attn_norm(x)
        if paged is None:
            x = x + self.attn(normed, cos, sin, mask, terms)
        else:
            x = x + self.attn.forward_paged(normed, cos, sin, *paged)
        normed = self.mlp_norm(x)
        return x + (self.mlp(normed, terms=terms) if self.routed else self.mlp(normed))


class MTPModule(nn.Module):
    """MTP depth k (V3 §2.2): h_k = Block(eh_proj([enorm(Emb(t_{i+k})); hnorm(h_{k-1})])), logits = head(norm(h_k)).

    The embedding comes first in the concatenation: that is the order DeepSeek's released eh_proj weights use.
    Embedding and output head are the main model's (shared, not copied).
    """

    def __init__(self, config: ModelConfig, layer_index: int, attention: type[nn.Module]):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Block(config, layer_index, attention)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        next_embeddings: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        paged: tuple[PagedStore, PagedBatch] | None = None,
        mask: torch.Tensor | None = None,
        terms: ForwardTerms | None = None,
    ) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(next_embeddings), self.hnorm(hidden)], dim=-1))
        return self.block(x, cos, sin, paged, mask, terms)

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


@dataclass
class ModelOutput:
    lm_loss: torch.Tensor  # next-token cross-entropy
    mtp_loss: torch.Tensor | None  # mean over MTP depths of their cross-entropy (the trainer weighs it by λ)
    head_input: torch.Tensor  # [B, T, dim], the final norm's output
    head: nn.Module
    terms: ForwardTerms  # what the forward was told, and the balance and indexer losses its layers gave back

    @cached_property
    def logits(self) -> torch.Tensor:
        """[B, T, vocab], computed only when read: the losses never materialize them (models/common/loss.py)."""
        return self.head(self.head_input)


class DeepseekV3Model(nn.Module):
    """DeepSeek-V3 (and the V2 layout: softmax routing, no MTP), and the base the other generations change: a
    subclass names its attention (`attention`), or its blocks and MTP modules (`block`, `mtp_module`), and the
    residual path between them (`add_modules`, `hidden_states`, `collapse`, `mtp_depth`)."""

    architectures: ClassVar[tuple[str, ...]] = ("deepseek_v3",)  # the config.architecture values it builds
    attention: ClassVar[type[nn.Module]] = MultiHeadLatentAttention
    # what training can ask of the generation before it starts
    takes_document_mask: ClassVar[bool] = True  # packed documents kept apart (train.document_mask, sft --pack)
    pipeline_refusal: ClassVar[str | None] = None  # why it cannot train under --pp, if it cannot

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.architecture not in self.architectures:
            raise TypeError(
                f"{type(self).__name__} builds {' and '.join(self.architectures)} models, not "
                f"{config.architecture}: nanoseek.build_model(config) picks the class"
            )
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = RotaryEmbedding(config)
        self.layers = nn.ModuleList(self.block(config, i) for i in range(config.num_hidden_layers))
        self.add_modules(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(
            self.mtp_module(config, config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)
        )
        self.reset_parameters()

    def block(self, config: ModelConfig, layer_index: int) -> nn.Module:
        return Block(config, layer_index, self.attention)

    @staticmethod
    def attention_core_flops(config: ModelConfig, visible: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """Forward FLOPs of QKᵀ and AV of every layer (or of `layers` MTP layers), for queries that see `visible`
        tokens (float64 tensor): each head against every visible key (nanoseek info, the trainer's MFU)."""
        per_layer = 2 * config.num_attention_heads * (config.qk_head_dim + config.attention_v_dim) * visible
        return (layers or config.num_hidden_layers) * per_layer

    def mtp_module(self, config: ModelConfig, layer_index: int) -> nn.Module:
        return MTPModule(config, layer_index, self.attention)

    def add_modules(self, config: ModelConfig) -> None:
        """What a generation adds between the layers and the final norm (V4: its second RoPE, the streams'
        collapse), registered there so that parameters keep the order of DeepSeek's module tree; V3 adds none."""

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """V3 initialization: every weight matrix N(0, 0.006), norms 1; balancing biases 0. V4's additions as
        transformers initializes them: attention sinks, compressor position biases and hyper-connection biases 0,
        hyper-connection scales 1 (their projections are matrices), hash tables drawn per token. Without a seed,
        drawn from torch's global generator in module order; with one, each parameter from (seed, its name) alone,
        which also holds for a sharded model (nanoseek.models.common.init): build on meta, parallelize,
        materialize, then call this."""
        std = self.config.initializer_range
        for name, param in self.named_parameters():
            if name.endswith((".bias", ".base", ".sinks", ".position_bias")):
                param.fill_(0.0)
            elif param.dim() < 2:
                param.fill_(1.0)
            elif seed is None:
                nn.init.normal_(param, std=std)
            else:
                seeded_normal_(param, std, seed, name)
        for module in self.modules():
            if isinstance(module, Router):
                module.expert_bias.zero_()
            elif isinstance(module, HashRouter):
                module.reset_table(torch.initial_seed() if seed is None else seed)
            elif isinstance(module, MoE):
                module.expert_load.zero_()
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """The buffers computed from the config rather than stored (RoPE's frequencies)."""
        self.rope.reset_parameters()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def indexers(self) -> list[nn.Module]:
        """The lightning indexers (V3.2: one per attention layer, MTP modules included; V4: one per CSA layer);
        V3 has none."""
        return []

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        with_mtp: bool = True,
        documents: torch.Tensor | None = None,
        terms: ForwardTerms | None = None,
    ) -> torch.Tensor | ModelOutput:
        """input_ids [B, T] → logits [B, T, vocab]; with targets [B, T] (input_ids shifted by one, -100 = ignore)
        a ModelOutput with the LM loss and, if the model has MTP modules and with_mtp, their loss. `documents`
        [B, T] (a document number per token) keeps the documents packed in a row from attending to each other.
        `terms`: the balance loss's α and DSA's stage in, the layers' auxiliary losses out (ModelOutput.terms)."""
        terms = ForwardTerms() if terms is None else terms
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden, position_args = self.hidden_states(self.embed(input_ids), positions, input_ids, documents, terms)
        head_input = self.norm(self.collapse(hidden))
        if targets is None:
            return self.head(head_input)
        lm_loss = linear_cross_entropy(head_input.flatten(0, 1), self.head.weight, targets.flatten())
        with_mtp = with_mtp and len(self.mtp) > 0
        mtp_loss = self._mtp_loss(hidden, input_ids, targets, position_args, terms) if with_mtp else None
        return ModelOutput(lm_loss, mtp_loss, head_input, self.head, terms)

    def hidden_states(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        input_ids: torch.Tensor,
        documents: torch.Tensor | None,
        terms: ForwardTerms,
    ) -> tuple[torch.Tensor, tuple]:
        """The embeddings x [B, T, dim] through every layer → the last layer's output (what MTP reads) and what
        positions MTP's blocks attend with: here (cos, sin, mask)."""
        cos, sin = self.rope(positions)
        mask = None if documents is None else document_mask(documents)
        for layer in self.layers:
            x = layer(x, cos, sin, mask=mask, terms=terms)
        return x, (cos, sin, mask)

    def collapse(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last layer's output → the final norm's input (V4: its streams collapsed into one)."""
        return hidden

    def forward_paged(self, input_ids: torch.Tensor, batch: PagedBatch, stores: PagedStore) -> torch.Tensor:
        """Inference: the flat new tokens input_ids [N] of a batch laid out as `batch` says, over every layer's
        paged store → final hidden states [N, dim] (before the norm: MTP's input; `logits` turns the rows that are
        sampled into logits)."""
        cos, sin = self.rope(batch.positions)
        x = self.embed(input_ids)[None]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, (stores.layer(i), batch))
        return x[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """final hidden states (forward_paged's) → logits"""
        return self.head(self.norm(self.collapse(hidden)))

    def mtp_forward_paged(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, batch: PagedBatch, stores: PagedStore, depth: int = 0
    ) -> torch.Tensor:
        """MTP module `depth` at the batch's positions i, from h_i [N, dim] and token t_{i+1} [N] → its hidden
        states [N, dim] (`mtp_logits` of a row: the logits for t_{i+2}, the draft)."""
        cos, sin = self.rope(batch.positions)
        paged = (stores.layer(self.config.num_hidden_layers + depth), batch)
        return self.mtp[depth](hidden[None], self.embed(next_ids)[None], cos, sin, paged)[0]

    def mtp_logits(self, hidden: torch.Tensor, depth: int = 0) -> torch.Tensor:
        return self.head(self.mtp[depth].head_input(hidden))

    def _mtp_loss(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_args: tuple,
        terms: ForwardTerms,
    ) -> torch.Tensor:
        """Depth k at position i sees h_{k-1}[i] and token t_{i+k} and predicts t_{i+k+1} = targets[i+k]; each depth
        is one position shorter, keeping the causal chain."""
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            n = input_ids.shape[1] - k
            if n <= 0:
                break
            hidden = self.mtp_depth(module, hidden[:, :n], input_ids[:, k:], position_args, terms)
            losses.append(
                linear_cross_entropy(
                    module.head_input(hidden).flatten(0, 1), self.head.weight, targets[:, k:].flatten()
                )
            )
        return torch.stack(losses).mean() if losses else hidden.new_zeros(())

    def mtp_depth(
        self, module: nn.Module, hidden: torch.Tensor, next_ids: torch.Tensor, position_args: tuple, terms: ForwardTerms
    ) -> torch.Tensor:
        """One MTP depth over the first n positions: hidden [B, n, dim], the tokens after them next_ids [B, n]."""
        n = hidden.shape[1]
        cos, sin, mask = position_args
        mask = None if mask is None else mask[..., :n, :n]
        return module(hidden, self.embed(next_ids), cos[:n], sin[:n], mask=mask, terms=terms)


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """[B, T] document numbers → [B, 1, T, T], True where a query may attend: causally, within its document."""
    T = documents.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal).unsqueeze(1)
