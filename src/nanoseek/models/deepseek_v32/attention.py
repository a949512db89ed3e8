"""DeepSeek-V3.2's attention: MLA whose queries see only the top-k tokens a lightning indexer picks (DSA, V3.2 §2.1).

Written as the diff of V3's MultiHeadLatentAttention: the same projections, latents and kernels; what changes is the
mask a training forward attends with, and, over the paged store, which cached latents a decode token gathers
(its top-k, so decode reads O(k) latents, not the whole context) and how a prefill chunk masks its context.
"""

from __future__ import annotations

import torch

from nanoseek.config import ModelConfig
from nanoseek.models.common.paged import PagedBatch, PagedStore, PrefillChunk
from nanoseek.models.common.terms import ForwardTerms
from nanoseek.models.deepseek_v3.attention import MultiHeadLatentAttention, gather
from nanoseek.models.deepseek_v32.indexer import LightningIndexer, index_scores, indexer_kl, top_k_mask


class SparseLatentAttention(MultiHeadLatentAttention):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.indexer = LightningIndexer(config)

    def attention_mask(
        self,
        x: torch.Tensor,
        q_input: torch.Tensor,
        kv_input: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        terms: ForwardTerms | None,
    ) -> torch.Tensor | None:
        """Each query sees only the top-k of what it may see (a mask over the full scores: the sparse gather is the
        decode path's), except in the dense warm-up, which trains the indexer alone. While the indexer learns (a
        DSA stage in `terms`, in training), also its KL loss against this attention's own distribution over the
        tokens attended to, added to terms (add_indexer_kl)."""
        B, T, _ = x.shape
        visible = (
            torch.ones(T, T, dtype=torch.bool, device=x.device).tril().expand(B, 1, T, T) if mask is None else mask
        )
        stage, learning = (None, False) if terms is None else terms.indexer_stage(self.training)
        # the indexer learns from its own loss only: its inputs are cut from the main model's graph
        with torch.set_grad_enabled(learning):
            scores = self.indexer(x.detach(), self.q_norm(q_input).detach(), cos, sin)  # [B, T, T]
        attended = (
            visible if stage == "warmup" else top_k_mask(scores.detach(), visible[:, 0], self.indexer.topk)[:, None]
        )
        if learning:
            with torch.no_grad():
                target = self.attention_distribution(q_input, kv_input, cos, sin, attended)
            terms.add_indexer_kl(indexer_kl(target, scores, attended[:, 0]))
        return mask if stage == "warmup" else attended

    @torch.no_grad()
    def attention_distribution(
        self, q_input: torch.Tensor, kv_input: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The indexer's target: attention probabilities summed over heads and L1-normalized → [B, T, T] fp32,
        computed in chunks of queries so that only [B, H, chunk, T] scores exist at once."""
        q = torch.cat(self.queries(q_input, cos, sin), dim=-1)  # [B, H, T, qk]
        k, _ = self.keys_values(*self.latents(kv_input, cos, sin))
        rows = []
        for start in range(0, q.shape[2], 512):
            chunk = slice(start, start + 512)
            scores = torch.matmul(q[:, :, chunk], k.transpose(-1, -2)).float() * self.softmax_scale
            probs = scores.masked_fill(~mask[:, :, chunk], float("-inf")).softmax(dim=-1).sum(dim=1)
            rows.append(probs / probs.sum(dim=-1, keepdim=True))
        return torch.cat(rows, dim=1)

    def index_new_tokens(
        self,
        x: torch.Tensor,
        q_input: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        store: PagedStore,
        batch: PagedBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens' indexer keys go to their slots; → their indexer queries [N, H', D] and weights [N, H']."""
        keys = self.indexer.keys(x, cos, sin)[0]
        store.index_keys.index_copy_(0, batch.slots, keys.to(store.index_keys.dtype))
        return self.indexer.queries(self.q_norm(q_input), cos, sin)[0], self.indexer.weights(x)[0]

    def decode_slots(
        self, index: tuple[torch.Tensor, torch.Tensor] | None, store: PagedStore, batch: PagedBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The indexer over each decode sequence's cached keys → the store slots of each token's top-k
        [rows·width, k] and which of them it may see [rows·width, 1, 1, k] (a short sequence in a padded batch has
        fewer than k); a context of at most k tokens is attended whole."""
        rows, width, k = batch.decode_rows, batch.decode_width, self.indexer.topk
        if index is None or batch.decode_context.shape[1] <= k:
            return super().decode_slots(index, store, batch)
        q, weights = (part[: batch.decode_tokens] for part in index)
        keys = gather(store.index_keys, batch.decode_context)  # [rows, S, D]
        scores = index_scores(q.view(rows, width, *q.shape[1:]), weights.view(rows, width, -1), keys)
        best = scores.masked_fill(~batch.decode_visible()[:, :, 0], float("-inf")).topk(k, dim=-1, sorted=False)
        slots = batch.decode_context.gather(1, best.indices.view(rows, width * k))
        return slots.view(rows * width, k), (best.values > float("-inf")).view(rows * width, 1, 1, k)

    def prefill_mask(
        self, index: tuple[torch.Tensor, torch.Tensor] | None, store: PagedStore, chunk: PrefillChunk
    ) -> torch.Tensor | None:
        """A chunk whose context exceeds k tokens attends to each query's top-k of its context."""
        if index is None or chunk.context.shape[0] <= self.indexer.topk:
            return super().prefill_mask(index, store, chunk)
        rows = slice(chunk.start, chunk.start + chunk.length)
        keys = gather(store.index_keys, chunk.context)[None]
        scores = index_scores(index[0][None, rows], index[1][None, rows], keys)[0]
        return top_k_mask(scores, chunk.visible(), self.indexer.topk)
