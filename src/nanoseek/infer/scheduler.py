"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step, in this order:
1. each decoding sequence computes its pending token (and its draft, when speculating); if the cache has no room
   for it, the newest running sequence is preempted: its blocks are released (full ones stay in the prefix cache)
   and it goes back to the front of the queue, to be recomputed later;
2. sequences part-way through their prompt continue with their next chunk;
3. waiting sequences join, their cached prefix found first, while the step's token budget lasts.
Prefill is chunked by the token budget, so a long prompt never stalls the decoding of the others. For DeepSeek-V4
(whose cached blocks resume a sequence only with a snapshot of its state), chunks end at block boundaries, and the
last one before the prompt's end is cut where the prompt's last full block ends: there the state is snapshot.

`static=True` is the previous server's policy, kept for comparison: a batch is admitted only when nothing runs,
and whole prompts are prefilled at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nanoseek.infer.blocks import BlockManager
from nanoseek.infer.request import Sequence


@dataclass
class Step:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, chunk length)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_seqs: int, token_budget: int, static: bool = False):
        self.blocks, self.max_seqs, self.token_budget, self.static = blocks, max_seqs, token_budget, static
        self.free_states = list(range(max_seqs - 1, -1, -1))  # state slots (V4's windows) of running sequences
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.preemptions = 0
        self.prompt_tokens_queried = self.prompt_tokens_hit = 0

    def schedule(self, decode_width: int) -> Step:
        step = Step()
        budget = self.token_budget if not self.static else 1 << 62
        admitting = not (self.static and self.running)
        for seq in list(self.running):
            if seq in self.running and seq.decoding and self._room_by_preempting(seq, seq.computed + decode_width):
                step.decode.append(seq)
                budget -= decode_width
        for seq in self.running:
            if not seq.decoding and budget > 0:
                chunk = self._chunk(seq, budget)
                if not self._reserve(seq, seq.computed + chunk):
                    break
                step.prefill.append((seq, chunk))
                budget -= chunk
        while admitting and budget > 0 and len(self.running) < self.max_seqs:
            seq = next((s for s in self.waiting if s.after is None or s.after.output or s.after.finish_reason), None)
            if seq is None or not self._admit(seq, budget):
                break
            chunk = self._chunk(seq, budget)
            step.prefill.append((seq, chunk))
            budget -= chunk
        return step

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """How many of its prompt tokens the sequence computes this step (its budget, at most)."""
        end = min(seq.length, seq.computed + budget)
        if self.blocks.needs_snapshots and not self.static:
            size = self.blocks.block_size
            boundary = (end if end < seq.length else seq.length - 1) // size * size
            end = boundary if boundary > seq.computed else end
        return end - seq.computed

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Find its cached prefix and room for its first chunk (what is left of the step's token budget), or leave
        it waiting (holding nothing)."""
        # a prompt to be scored is computed whole: a cached block has no logits to give
        cached = (
            self.blocks.match_prefix(seq.tokens, self.blocks.root(seq.params.cache_salt))
            if seq.params.prompt_logprobs is None
            else []
        )
        seq.blocks, seq.computed = cached, len(cached) * self.blocks.block_size
        seq.restore_from = self.blocks.snapshot_of[cached[-1]] if cached and self.blocks.needs_snapshots else None
        seq.hashed_blocks = len(cached)
        seq.block_hashes = [self.blocks.hash_of[b] for b in cached]
        if not self._reserve(seq, seq.computed + self._chunk(seq, budget)):
            self.blocks.release(seq.blocks)
            seq.blocks, seq.computed, seq.hashed_blocks, seq.block_hashes = [], 0, 0, []
            seq.restore_from = None
            return False
        if not seq.admitted:  # the first admission is what the client is told about
            seq.cached_tokens = seq.computed
            self.prompt_tokens_queried += len(seq.prompt)
            self.prompt_tokens_hit += seq.computed
        seq.admitted = True
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.state_slot = self.free_states.pop()
        return True

    def _reserve(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for positions 0..tokens-1 of the sequence, if the cache has them."""
        missing = -(-tokens // self.blocks.block_size) - len(seq.blocks)
        if missing <= 0:
            return True
        new = self.blocks.allocate(missing)
        if new is None:
            return False
        seq.blocks.extend(new)
        return True

    def _room_by_preempting(self, seq: Sequence, tokens: int) -> bool:
        while not self._reserve(seq, tokens):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Give the sequence's blocks back and queue it first, to recompute prompt + output so far."""
        self.release(seq)
        seq.computed, seq.hashed_blocks, seq.block_hashes, seq.snapshots = 0, 0, [], []
        seq.draft = seq.draft_probs = None
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def release(self, seq: Sequence) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks = []
        if seq in self.running:
            self.running.remove(seq)
            self.free_states.append(seq.state_slot)
