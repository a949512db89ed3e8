"""The model runner: turns a scheduled step into one forward over the paged latent store, samples (or verifies
drafts) on the device, runs the MTP module to draft the next tokens, and brings everything back to the host in one
transfer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanoseek.infer.request import Sequence
from nanoseek.infer.sampler import LogitEdits, LogitShaping, Penalties, RowSettings, sample, token_logprobs, verify
from nanoseek.infer.scheduler import Step
from nanoseek.infer.transfer import HostTransfer
from nanoseek.models.common.paged import PagedBatch, PagedStore, PrefillChunk, Segment
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.deepseek_v4.paged import HybridStore


@dataclass
class SeqResult:
    tokens: list[int]  # sampled tokens, in order (decode with an accepted draft: two)
    computed: int  # how many more tokens now have correct latents in the cache
    logprobs: list[list[float]]  # per token: [chosen, top ids..., top logprobs...] (empty rows when not asked)
    draft: int | None = None
    draft_probs: torch.Tensor | None = None
    prompt_logprobs: list[list[float]] = field(default_factory=list)  # the same rows for the next prompt tokens


class ModelRunner:
    def __init__(
        self,
        model: DeepseekV3Model,
        store: PagedStore | HybridStore,
        block_size: int,
        speculate: bool,
        by_segments: bool,
    ):
        """by_segments: the store keeps part of each sequence in a state slot (V4), and a forward addresses it by
        segment (state slot, block table) rather than by the slots of each token and context."""
        self.model, self.store, self.block_size, self.speculate = model, store, block_size, speculate
        self.by_segments = by_segments
        self.device = store.device

    def slots(self, seq: Sequence, start: int, stop: int) -> torch.Tensor:
        """Store slots of the sequence's positions start..stop-1 (its block table unrolled)."""
        positions = torch.arange(start, stop)
        return torch.tensor(seq.blocks)[positions // self.block_size] * self.block_size + positions % self.block_size

    def _table(self, seq: Sequence) -> torch.Tensor:
        return torch.tensor(seq.blocks, device=self.device)

    @torch.inference_mode()
    def run(self, step: Step) -> dict[Sequence, SeqResult]:
        width = 2 if self.speculate else 1
        ids, positions, slots, contexts, chunks, segments = [], [], [], [], [], []
        hybrid = self.by_segments
        # V4 (hybrid) reads its window and entries through its segments: no per-token slots, no contexts to gather
        for seq in step.decode:
            if hybrid:
                segments.append(Segment(len(ids), width, seq.computed, seq.state_slot, self._table(seq)))
            else:
                slots.append(self.slots(seq, seq.computed, seq.computed + width))
                contexts.append(self.slots(seq, 0, seq.computed + width))
            ids += [seq.last_token] + ([seq.draft] if self.speculate else [])
            positions.append(torch.arange(seq.computed, seq.computed + width))
        start = len(ids)
        for seq, length in step.prefill:
            if hybrid:
                segments.append(Segment(len(ids), length, seq.computed, seq.state_slot, self._table(seq)))
                context = torch.empty(0, dtype=torch.long)
            else:
                slots.append(self.slots(seq, seq.computed, seq.computed + length))
                context = self.slots(seq, 0, seq.computed + length)
            ids += seq.tokens[seq.computed : seq.computed + length]
            positions.append(torch.arange(seq.computed, seq.computed + length))
            chunks.append(PrefillChunk(start, length, context.to(self.device)))
            start += length
        decode_context = None
        if contexts:
            decode_context = torch.nn.utils.rnn.pad_sequence(contexts, batch_first=True).to(self.device)
        flat_slots = torch.cat(slots) if slots else torch.empty(0, dtype=torch.long)
        batch = PagedBatch(
            torch.cat(positions).to(self.device),
            flat_slots.to(self.device),
            len(step.decode),
            width,
            decode_context,
            chunks,
            segments,
        )
        ids_t = torch.tensor(ids, device=self.device)
        hidden = self.model.forward_paged(ids_t, batch, self.store)
        return self._sample(step, batch, ids_t, hidden)

    def _settings(self, seqs: list[Sequence]) -> RowSettings:
        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        params = [s.params for s in seqs]
        return RowSettings(
            column([p.temperature for p in params], torch.float32),
            column([p.top_k or 0 for p in params], torch.long),
            column([p.top_p or 1.0 for p in params], torch.float32),
            column([s.seed for s in seqs], torch.long),
            column([s.draws for s in seqs], torch.long),
            all_greedy=all(p.temperature <= 0 for p in params),
            unfiltered=all(not p.top_k and (p.top_p or 1.0) >= 1.0 for p in params),
        )

    def _sample(
        self, step: Step, batch: PagedBatch, ids: torch.Tensor, hidden: torch.Tensor
    ) -> dict[Sequence, SeqResult]:
        decode_tokens = batch.decode_tokens
        finals = [
            (seq, chunk)
            for (seq, _), chunk in zip(step.prefill, batch.prefills)
            if seq.computed + chunk.length == seq.length
        ]
        final_rows = [chunk.start + chunk.length - 1 for _, chunk in finals]
        rows = torch.cat([torch.arange(decode_tokens), torch.tensor(final_rows, dtype=torch.long)]).to(self.device)
        logits = self.model.logits(hidden[rows])
        decode_rows = [(seq, seq.draft if j else None) for seq in step.decode for j in range(batch.decode_width)]
        shaping = self._shaping(decode_rows + [(seq, None) for seq, _ in finals], logits.shape[-1])
        sampled_logits = logits if shaping is None else shaping.apply(logits)  # logprobs stay the model's
        transfer = HostTransfer()
        accepted = None
        sampled = torch.empty(0, dtype=torch.long, device=self.device)
        if step.decode:
            settings = self._settings(step.decode)
            dec_logits = sampled_logits[:decode_tokens]
            if self.speculate:
                drafts = torch.tensor([s.draft for s in step.decode], device=self.device)
                draft_probs = (
                    None
                    if settings.all_greedy
                    else torch.stack(
                        [
                            s.draft_probs
                            if s.draft_probs is not None  # a greedy row's draft: its one-hot
                            else torch.zeros_like(logits[0]).index_fill_(
                                0, torch.tensor(s.draft, device=self.device), 1.0
                            )
                            for s in step.decode
                        ]
                    )
                )
                accepted, pairs = verify(dec_logits.view(len(step.decode), 2, -1), drafts, draft_probs, settings)
                sampled = pairs.flatten()
                transfer.add("accepted", accepted)
            else:
                sampled = sample(dec_logits, settings)[0]
        if finals:
            sampled = torch.cat(
                [sampled, sample(sampled_logits[decode_tokens:], self._settings([s for s, _ in finals]))[0]]
            )
        transfer.add("tokens", sampled)
        top = max(
            (
                s.params.logprobs or 0
                for s in step.decode + [seq for seq, _ in step.prefill]
                if s.params.logprobs is not None
            ),
            default=None,
        )
        if top is not None:
            transfer.add("logprobs", token_logprobs(logits, sampled, top))
        scored = self._scored_prompt_rows(step, batch)
        prompt_top = max((seq.params.prompt_logprobs for seq, _ in scored), default=0)
        if scored:
            rows = torch.tensor([r for _, seq_rows in scored for r, _ in seq_rows], device=self.device)
            targets = torch.tensor([t for _, seq_rows in scored for _, t in seq_rows], device=self.device)
            transfer.add("prompt_logprobs", token_logprobs(self.model.logits(hidden[rows]), targets, prompt_top))
        drafted = self._draft(step, batch, ids, hidden, accepted, sampled, finals) if self.speculate else None
        if drafted is not None:
            transfer.add("drafts", drafted[0])
        return self._unpack(step, transfer.fetch(), finals, top, drafted, scored, prompt_top)

    def _shaping(self, rows: list[tuple[Sequence, int | None]], vocab: int) -> LogitShaping | None:
        """The logit edits of each sampled row (its sequence, and the draft it follows when it verifies one), or
        None when no row has any. Each sequence's tensors are made at its first sample and grown since; a step only
        stacks them."""
        if not any(seq.params.shapes_logits for seq, _ in rows):
            return None
        params = [seq.params for seq, _ in rows]
        edits = []
        for seq, _ in rows:
            if seq.logit_edits is None:
                p = seq.params
                seq.logit_edits = LogitEdits.build(
                    seq.prompt, p.penalizes, p.repetition_penalty != 1.0, p.logit_bias, vocab, self.device
                )
            seq.logit_edits.catch_up(seq.output)
            edits.append(seq.logit_edits)

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=self.device)

        def stacked(tensors: list[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
            zeros = torch.zeros(vocab, dtype=dtype, device=self.device)
            return torch.stack([zeros if t is None else t for t in tensors])

        drafted = [(r, draft) for r, (_, draft) in enumerate(rows) if draft is not None]
        penalties = None
        if any(p.penalizes for p in params):
            generated = stacked([e.counts for e in edits], torch.float32)
            if drafted:  # a row verifying a draft samples after it: the draft counts as generated
                index = torch.tensor(drafted, device=self.device).T
                generated.index_put_(
                    (index[0], index[1]), torch.ones(len(drafted), device=self.device), accumulate=True
                )
            seen = generated > 0
            if any(e.prompt_seen is not None for e in edits):
                seen |= stacked([e.prompt_seen for e in edits], torch.bool)
            penalties = Penalties(
                generated,
                seen,
                column([p.presence_penalty for p in params]),
                column([p.frequency_penalty for p in params]),
                column([p.repetition_penalty for p in params]),
            )
        bias = stacked([e.bias for e in edits], torch.float32) if any(e.bias is not None for e in edits) else None
        banned_pairs = [
            (r, t)
            for r, ((seq, draft), p) in enumerate(zip(rows, params))
            if len(seq.output) + (draft is not None) < p.min_tokens
            for t in p.stop_token_ids
        ]
        banned = None
        if banned_pairs:
            index = torch.tensor(banned_pairs, device=self.device).T
            banned = torch.zeros(len(rows), vocab, dtype=torch.bool, device=self.device)
            banned[index[0], index[1]] = True
        if penalties is None and bias is None and banned is None:
            return None
        return LogitShaping(penalties, bias, banned)

    @staticmethod
    def _scored_prompt_rows(step: Step, batch: PagedBatch) -> list[tuple[Sequence, list[tuple[int, int]]]]:
        """For each prefilled sequence whose prompt is to be scored: (row in the flat batch, next prompt token) of
        every chunk position whose next token is a prompt token not scored yet (a preempted sequence recomputes
        positions it already scored)."""
        scored = []
        for (seq, length), chunk in zip(step.prefill, batch.prefills):
            if seq.params.prompt_logprobs is None:
                continue
            first = max(seq.computed, len(seq.prompt_logprobs))
            last = min(seq.computed + length, len(seq.prompt) - 1)
            rows = [(chunk.start + p - seq.computed, seq.prompt[p + 1]) for p in range(first, last)]
            if rows:
                scored.append((seq, rows))
        return scored

    def _draft(
        self,
        step: Step,
        batch: PagedBatch,
        ids: torch.Tensor,
        hidden: torch.Tensor,
        accepted: torch.Tensor | None,
        sampled: torch.Tensor,
        finals: list[tuple[Sequence, PrefillChunk]],
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The MTP module over every position of the step (it fills its own cache at each), reading t_{i+1}: the
        verified tokens for decode rows, the next prompt token (or the token just sampled) for prefill chunks.
        → drafts and their distributions for the decoding and newly decoding sequences."""
        decode_tokens = batch.decode_tokens
        next_ids = torch.cat([ids[1:], ids[:1]])  # t_{i+1} within each chunk; the chunk ends are fixed below
        next_ids[:decode_tokens] = sampled[:decode_tokens]
        for (seq, length), chunk in zip(step.prefill, batch.prefills):
            end = seq.computed + length
            if end < seq.length:
                next_ids[chunk.start + length - 1] = seq.tokens[end]
        final_rows = torch.tensor([c.start + c.length - 1 for _, c in finals], dtype=torch.long, device=self.device)
        next_ids[final_rows] = sampled[decode_tokens:]
        draft_hidden = self.model.mtp_forward_paged(hidden, next_ids, batch, self.store)
        seqs = step.decode + [seq for seq, _ in finals]
        if not seqs:
            return None
        decode_rows = torch.arange(len(step.decode), device=self.device) * 2
        if accepted is not None:
            decode_rows = decode_rows + accepted.long()  # the draft follows the last verified token
        draft_logits = self.model.mtp_logits(draft_hidden[torch.cat([decode_rows, final_rows])])
        return sample(draft_logits, self._settings(seqs), stream=3)

    def _unpack(
        self,
        step: Step,
        host: dict[str, list[float]],
        finals: list[tuple[Sequence, PrefillChunk]],
        top: int | None,
        drafted: tuple[torch.Tensor, torch.Tensor | None] | None,
        scored: list[tuple[Sequence, list[tuple[int, int]]]],
        prompt_top: int,
    ) -> dict[Sequence, SeqResult]:
        width = 2 if self.speculate else 1
        n_dec = len(step.decode)
        flags = host.get("accepted", [0.0] * n_dec)
        tokens = [int(t) for t in host["tokens"]]
        stride = 1 + 2 * top if top is not None else 0
        logprobs = [host.get("logprobs", [])[i * stride : (i + 1) * stride] for i in range(len(tokens))]
        prompt_rows: dict[Sequence, list[list[float]]] = {}
        scores, at, row = host.get("prompt_logprobs", []), 0, 1 + 2 * prompt_top
        for seq, rows in scored:
            prompt_rows[seq] = [scores[at + i * row : at + (i + 1) * row] for i in range(len(rows))]
            at += len(rows) * row
        drafts = [int(t) for t in host.get("drafts", [])]
        results: dict[Sequence, SeqResult] = {}
        for i, seq in enumerate(step.decode):
            keep = 2 if flags[i] else 1
            results[seq] = SeqResult(
                tokens[i * width : i * width + keep],
                keep if self.speculate else 1,
                logprobs[i * width : i * width + keep],
            )
        for j, (seq, _) in enumerate(finals):
            results[seq] = SeqResult([tokens[n_dec * width + j]], 0, [logprobs[n_dec * width + j]])
        for seq, length in step.prefill:
            results.setdefault(seq, SeqResult([], 0, [])).computed = length
            results[seq].prompt_logprobs = prompt_rows.get(seq, [])
        if drafted is not None:
            for k, seq in enumerate(step.decode + [seq for seq, _ in finals]):
                results[seq].draft = drafts[k]
                results[seq].draft_probs = None if drafted[1] is None else drafted[1][k]
        return results
