"""Batched generation over the latent cache: one prefill of all prompts (right-padded, each at its own
positions), then one token per sequence per step. Stop tokens, stop strings, streaming, per-request sampling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from nanoseek.errors import NanoseekError
from nanoseek.infer.cache import LatentCache
from nanoseek.infer.sampling import sample_next
from nanoseek.model.transformer import Transformer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or (self.top_p is not None and not 0 < self.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Literal["stop", "length", "abort"] | None = None
    prompt_tokens: int = 0


# on_token(sequence index, new text (possibly empty), finished)
StreamCallback = Callable[[int, str, bool], None]


class _TextTracker:
    """Incremental detokenization that never emits half a character or the start of a stop string."""

    def __init__(self, decode: Callable[[list[int]], str] | None, stops: tuple[str, ...]):
        self.decode, self.stops, self.emitted = decode, stops, 0

    def update(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """→ (new text to emit, whether a stop string was hit)."""
        if self.decode is None:
            return "", False
        text = self.decode(ids)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                delta, self.emitted = text[self.emitted:at], at
                return delta, True
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
                safe -= 1
            for stop in self.stops:  # hold back a suffix that may grow into a stop string
                for n in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:n]):
                        safe -= n
                        break
        delta = text[self.emitted:max(safe, self.emitted)]
        self.emitted = max(safe, self.emitted)
        return delta, False

    def text(self, ids: list[int]) -> str:
        return "" if self.decode is None else self.decode(ids)[: self.emitted]


class Engine:
    def __init__(self, model: Transformer, decode: Callable[[list[int]], str] | None = None):
        if model.config.attention_type != "mla":
            raise NanoseekError("generation runs over MLA's latent cache; the dense GQA baseline is saved in Llama "
                                "layout for transformers to sample from")
        self.model = model.eval()
        self.decode = decode
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @property
    def max_len(self) -> int:
        return self.model.config.max_position_embeddings

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's context of {self.max_len} tokens")
        if max(prompt) >= self.model.config.vocab_size or min(prompt) < 0:
            raise ValueError("prompt holds token ids outside the vocabulary")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 on_token: StreamCallback | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Completion]:
        """`cancelled(row)` lets a caller drop a sequence whose client went away (finish_reason 'abort')."""
        batch = len(prompts)
        params = params if isinstance(params, list) else [params] * batch
        for prompt, p in zip(prompts, params):
            self.check(prompt, p)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        total = max(len(prompt) + p.max_new_tokens for prompt, p in zip(prompts, params))
        cache = LatentCache(self.model.config, batch, total, self.device, self.dtype)
        padded = torch.zeros(batch, int(lengths.max()), dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = torch.tensor(prompt)
        positions = torch.arange(padded.shape[1], device=self.device).expand(batch, -1)
        logits, _ = self.model.forward_cached(padded, positions, cache)
        logits = logits[torch.arange(batch), lengths - 1]  # each prompt's last real token

        generators = [torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None else None
                      for p in params]
        trackers = [_TextTracker(self.decode, p.stop_strings) for p in params]
        results = [Completion(prompt_tokens=len(prompt)) for prompt in prompts]
        next_ids = torch.zeros(batch, dtype=torch.long, device=self.device)
        while True:
            for row, (p, result) in enumerate(zip(params, results)):
                if result.finish_reason is not None:
                    continue
                if cancelled is not None and cancelled(row):
                    result.finish_reason = "abort"
                    continue
                token = int(sample_next(logits[row: row + 1], p.temperature, p.top_k, p.top_p, generators[row]))
                next_ids[row] = token
                if token in p.stop_token_ids:
                    result.finish_reason = "stop"
                else:
                    result.token_ids.append(token)
                    if len(result.token_ids) >= p.max_new_tokens:
                        result.finish_reason = "length"
                delta, hit_stop = trackers[row].update(result.token_ids, final=result.finish_reason is not None)
                if hit_stop:
                    result.finish_reason = "stop"
                if on_token is not None:
                    on_token(row, delta, result.finish_reason is not None)
            if all(r.finish_reason is not None for r in results):
                break
            # finished rows keep stepping at their last position (harmless, and keeps the batch rectangular)
            lengths = torch.where(torch.tensor([r.finish_reason is None for r in results], device=self.device),
                                  lengths + 1, lengths).clamp(max=total - 1)
            logits, _ = self.model.forward_cached(next_ids[:, None], (lengths - 1)[:, None], cache)
            logits = logits[:, -1]
        for result, tracker in zip(results, trackers):
            result.text = tracker.text(result.token_ids)
        return results
