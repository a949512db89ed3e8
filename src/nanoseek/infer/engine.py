"""The serving engine: a short step loop over the scheduler (who runs), the block manager (where their latents
live), the model runner (one forward, sampling on the device) and the detokenizer (what the client sees).

Requests may be added and aborted from any thread; `step()` runs on one. `generate()` runs a list of prompts to the
end, for the CLI and for offline use.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from nanoseek.errors import NanoseekError
from nanoseek.infer.blocks import BlockManager
from nanoseek.infer.detokenize import Detokenizer
from nanoseek.infer.histogram import LATENCY_BUCKETS, PER_TOKEN_BUCKETS, Histogram
from nanoseek.infer.request import Completion, SamplingParams, Sequence, TokenLogprob
from nanoseek.infer.runner import ModelRunner, SeqResult
from nanoseek.infer.scheduler import Scheduler, Step
from nanoseek.memory import available_memory
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.registry import architecture

# on_token(sequence index, new text (possibly empty), finished) — generate()'s streaming callback
StreamCallback = Callable[[int, str, bool], None]


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 64  # tokens per cache block (FlashMLA's)
    cache_memory: float | None = None  # bytes of latent cache; None: room for max_seqs full contexts (≤ 25 % RAM)
    max_seqs: int = 64  # sequences running at once
    token_budget: int = 512  # tokens per step: decodes first, then prefill chunks
    speculation: bool | None = None  # MTP drafts verified in the batch; None: on when the model has an MTP module
    static: bool = False  # the previous server's static batching, for comparison
    state_snapshots: int | None = None  # V4: state slots for the prefix cache's snapshots; None: 2 per max_seqs

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_seqs < 1 or self.token_budget < 2:
            raise ValueError("block_size and max_seqs must be >= 1, token_budget >= 2")
        if self.state_snapshots is not None and self.state_snapshots < 0:
            raise ValueError(f"state_snapshots must be >= 0, got {self.state_snapshots}")
        if self.cache_memory is not None and self.cache_memory <= 0:
            raise ValueError(f"the cache memory must be positive, got {self.cache_memory}")


class Engine:
    def __init__(
        self,
        model: DeepseekV3Model,
        decode: Callable[[list[int]], str] | None = None,
        config: EngineConfig | None = None,
    ):
        layout = architecture(model.config).store
        self.config = config = config or EngineConfig()
        self.model, self.decode = model.eval(), decode
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        mc, element = model.config, parameter.element_size()
        context_bytes = layout.serving_bytes(mc, mc.max_position_embeddings + 1, element)  # a whole context
        if config.speculation and not len(model.mtp):
            raise NanoseekError("speculation needs a model with an MTP module (num_nextn_predict_layers >= 1)")
        if config.speculation and not layout.drafts:
            raise NanoseekError(
                f"speculation is not built for {mc.architecture} models (serve them with --no-speculation)"
            )
        self.speculate = bool(len(model.mtp)) and layout.drafts if config.speculation is None else config.speculation
        # a layout that keeps sequence state outside the blocks (V4) has more state slots for the prefix cache's
        # snapshots (a block alone cannot resume a sequence)
        snapshots = 2 * config.max_seqs if config.state_snapshots is None else config.state_snapshots
        states = config.max_seqs + (snapshots if layout.keeps_state else 0)
        memory = config.cache_memory or min(
            config.max_seqs * context_bytes + (states - config.max_seqs) * layout.state_bytes(mc, element),
            available_memory(self.device) // 4,
        )
        self.store = store = layout.build(model, int(memory), config.block_size, states, self.device, self.dtype)
        self.blocks = BlockManager(
            store.block_count(config.block_size),
            config.block_size,
            list(range(config.max_seqs, states)) if layout.keeps_state else None,
        )
        self.scheduler = Scheduler(self.blocks, config.max_seqs, config.token_budget, config.static)
        self.runner = ModelRunner(model, store, config.block_size, self.speculate, layout.keeps_state)
        self.cache_bytes = store.nbytes
        self._inbox: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self.generated_tokens = self.drafted = self.accepted = self.steps = 0
        self.failing: str | None = None  # why the last step ran nothing (None: it ran), for the server's /health
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last steps, for tokens/s
        self.histograms = {
            "queue": Histogram("nanoseek_queue_time_seconds", "Time from arrival to admission", LATENCY_BUCKETS),
            "ttft": Histogram(
                "nanoseek_time_to_first_token_seconds", "Time from arrival to the first token", LATENCY_BUCKETS
            ),
            "tpot": Histogram(
                "nanoseek_time_per_output_token_seconds",
                "Time per output token after the first, per finished sequence",
                PER_TOKEN_BUCKETS,
            ),
        }

    @property
    def max_len(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def cache_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the "
                f"model's context of {self.max_len} tokens"
            )
        if len(prompt) + params.max_new_tokens + 1 > self.cache_tokens:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the "
                f"latent cache of {self.cache_tokens} tokens"
            )
        if max(prompt) >= self.model.config.vocab_size or min(prompt) < 0:
            raise ValueError("prompt holds token ids outside the vocabulary")
        if any(not 0 <= token < self.model.config.vocab_size for token, _ in params.logit_bias):
            raise ValueError("logit_bias names token ids outside the vocabulary")

    def add(self, prompt: list[int], params: SamplingParams, after: Sequence | None = None) -> Sequence:
        """Queue a request (from any thread); ValueError if it can never run."""
        self.check(prompt, params)
        seq = Sequence(
            list(prompt), params, Detokenizer(self.decode, params.stop_strings), after, arrived=time.monotonic()
        )
        seq.seed &= (1 << 63) - 1
        with self._lock:
            self._inbox.append(seq)
        return seq

    @staticmethod
    def abort(seq: Sequence) -> None:
        """Stop a sequence (from any thread); it leaves at the next step with finish_reason 'abort'."""
        seq.aborted = True

    @property
    def waiting(self) -> int:
        """Sequences queued and not yet admitted to the running batch (any thread: len() of each is atomic)."""
        return len(self._inbox) + len(self.scheduler.waiting)

    def has_work(self) -> bool:
        return bool(self._inbox or self.scheduler.waiting or self.scheduler.running)

    def step(self) -> list[Sequence]:
        """One forward for the scheduled sequences → those that produced text or finished (their new_text set)."""
        with self._lock:
            self.scheduler.waiting.extend(self._inbox)
            self._inbox.clear()
        changed = []
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.aborted:
                self._finish(seq, "abort")
                changed.append(seq)
        plan = self.scheduler.schedule(2 if self.speculate else 1)
        if not plan:
            return changed
        now = time.monotonic()
        for seq, _ in plan.prefill:
            if seq.admitted_at is None:
                seq.admitted_at = now
                self.histograms["queue"].observe(now - seq.arrived)
            if seq.restore_from is not None:  # V4 admitted on a cached prefix: its state as it was there
                self.store.copy_state(seq.restore_from, seq.state_slot)
                seq.restore_from = None
        try:
            results = self.runner.run(plan)
            self.failing = None
        except Exception as e:
            results, failed = self._isolate(plan, e)
            changed += failed
            self.failing = None if results else f"generation failed: {e}"  # not one sequence could run
        produced = 0
        for seq, result in results.items():
            produced += self._commit(seq, result)
            if result.tokens or seq.finish_reason:
                changed.append(seq)
        self.steps += 1
        self.generated_tokens += produced
        now = time.monotonic()
        with self._lock:  # stats() reads it from the server's thread
            self._recent.append((now, produced))
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()
        return changed

    def _isolate(self, plan: Step, error: Exception) -> tuple[dict[Sequence, SeqResult], list[Sequence]]:
        """A step that raised is run again one sequence at a time, so that a request that breaks the forward fails
        alone instead of taking the batch with it → (the others' results, the sequences failed). A latent cache
        is written by position, so running a part again is exact; V4's windows were advanced in place by the
        failed forward, so there every sequence of the step fails."""
        parts = [Step(decode=[seq]) for seq in plan.decode] + [Step(prefill=[part]) for part in plan.prefill]
        results: dict[Sequence, SeqResult] = {}
        failed = []
        for part in parts:
            seq = part.decode[0] if part.decode else part.prefill[0][0]
            try:
                if self.blocks.needs_snapshots:
                    raise error
                results.update(self.runner.run(part))
            except Exception as e:
                seq.error = f"generation failed: {e}"
                self._finish(seq, "abort")
                failed.append(seq)
        return results, failed

    def _commit(self, seq: Sequence, result: SeqResult) -> int:
        """Apply a step's result to the sequence: cache progress, new tokens (stop rules), prefix registration."""
        if seq.decoding and self.speculate:
            self.drafted += 1
            self.accepted += len(result.tokens) - 1
        seq.computed += result.computed
        seq.draws += bool(result.tokens)  # counts sampling steps only: how a prompt was chunked changes nothing
        seq.draft, seq.draft_probs = result.draft, result.draft_probs
        params, added = seq.params, 0
        first_scored = len(seq.prompt_logprobs) + 1
        seq.prompt_logprobs += [
            _logprob_entry(seq.prompt[first_scored + j], row, params.prompt_logprobs or 0)
            for j, row in enumerate(result.prompt_logprobs)
        ]
        for token, logprob in zip(result.tokens, result.logprobs):
            if len(seq.output) >= params.max_new_tokens:  # max_new_tokens 0: the prompt was only scored
                seq.finish_reason = "length"
                break
            entry = None if params.logprobs is None else _logprob_entry(token, logprob, params.logprobs)
            if token in params.stop_token_ids:
                seq.finish_reason, seq.stop_logprob = "stop", entry
                break
            seq.output.append(token)
            added += 1
            if seq.first_token_at is None:
                seq.first_token_at = time.monotonic()
                self.histograms["ttft"].observe(seq.first_token_at - seq.arrived)
            if entry is not None:
                seq.logprobs.append(entry)
            if len(seq.output) >= params.max_new_tokens:
                seq.finish_reason = "length"
                break
        if added or seq.finish_reason:
            seq.new_text, hit_stop = seq.detokenizer.update(seq.output, final=seq.finish_reason is not None)
            if hit_stop:
                seq.finish_reason = "stop"
        self._register_blocks(seq)  # after the new tokens: a block is keyed by the token that follows it
        if seq.finish_reason:
            self._finish(seq, seq.finish_reason)
        return added

    def _register_blocks(self, seq: Sequence) -> None:
        """Full blocks whose latents are all computed (and whose next token is known) join the prefix cache."""
        known = min(seq.computed + 1, seq.length)
        # most steps complete no block: only then is the sequence's token list (O(context)) built
        if (known - 1) // self.blocks.block_size > seq.hashed_blocks:
            previous = seq.block_hashes[-1] if seq.block_hashes else self.blocks.root(seq.params.cache_salt)
            for key in self.blocks.keys(seq.tokens[:known], seq.hashed_blocks, previous):
                self.blocks.register(seq.blocks[seq.hashed_blocks], key)
                seq.block_hashes.append(key.digest)
                seq.hashed_blocks += 1
        if self.blocks.needs_snapshots:
            self._snapshot(seq)

    def _snapshot(self, seq: Sequence) -> None:
        """V4: the state after the last full block before the sequence's last token (its prompt's, then its
        output's as it grows) into a snapshot, so that the prompt again, or a next turn that extends it, resumes
        there. A sequence keeps two: its first (the prompt's) and its latest."""
        size = self.blocks.block_size
        if not seq.computed or seq.computed != (seq.length - 1) // size * size:
            return
        block = seq.blocks[seq.computed // size - 1]
        slot = self.blocks.snapshot_slot(block) if block in self.blocks.hash_of else None
        if slot is None:
            return
        self.store.copy_state(seq.state_slot, slot)
        if len(seq.snapshots) >= 2:
            self.blocks.drop_snapshot(seq.snapshots.pop())
        seq.snapshots.append(block)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if reason != "abort" and len(seq.output) > 1:
            self.histograms["tpot"].observe((time.monotonic() - seq.first_token_at) / (len(seq.output) - 1))
        self.scheduler.release(seq)
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        if reason == "abort":
            seq.new_text = ""

    def stats(self) -> dict[str, float]:
        """Counters and gauges for /metrics; safe to call from any thread."""
        with self._lock:
            recent = list(self._recent)
        produced = sum(n for _, n in recent[1:])  # tokens made after the first timestamp of the window
        span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
        s = self.scheduler
        return {
            "running": len(s.running),
            "waiting": self.waiting,
            "cache_blocks_used": self.blocks.used_blocks,
            "cache_blocks_total": self.blocks.num_blocks,
            "cache_tokens_total": self.cache_tokens,
            "prefix_hit_rate": s.prompt_tokens_hit / max(1, s.prompt_tokens_queried),
            "prompt_tokens": s.prompt_tokens_queried,
            "cached_prompt_tokens": s.prompt_tokens_hit,
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": produced / span if span > 0 else 0.0,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": self.accepted / max(1, self.drafted),
            "preemptions": s.preemptions,
        }

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        on_token: StreamCallback | None = None,
    ) -> list[Completion]:
        """Run the prompts to the end (every step also serves whatever else was added)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params):
            self.check(prompt, p)
        seqs = [self.add(prompt, p) for prompt, p in zip(prompts, params)]
        index = {seq: i for i, seq in enumerate(seqs)}
        while any(seq.finish_reason is None for seq in seqs):
            for seq in self.step():
                if on_token is not None and seq in index:
                    on_token(index[seq], seq.new_text, seq.finish_reason is not None)
        return [seq.completion() for seq in seqs]


def _logprob_entry(token: int, row: list[float], k: int) -> TokenLogprob:
    """A runner row [chosen logprob, top ids..., top logprobs...] → the token's entry with its k most likely."""
    half = (len(row) - 1) // 2
    return TokenLogprob(token, row[0], [(int(i), v) for i, v in zip(row[1 : 1 + half][:k], row[1 + half :][:k])])
