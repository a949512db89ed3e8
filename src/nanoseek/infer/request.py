"""A request's sampling settings, and a sequence's state inside the engine."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Literal

import torch

from nanoseek.infer.detokenize import Detokenizer
from nanoseek.infer.sampler import LogitEdits

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k ≥ 0: the chosen token's logprob and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (an evaluation's scores)
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time the token was generated so far
    repetition_penalty: float = 1.0  # CTRL's (transformers, vLLM): a seen token's logit divided (> 0) or multiplied
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    min_tokens: int = 0  # the stop tokens cannot be sampled before this many tokens
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks are shared only among requests with the same salt

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or (self.max_new_tokens == 0 and self.prompt_logprobs is None):
            raise ValueError(
                f"max_new_tokens must be at least 1 (0 only to score the prompt), got {self.max_new_tokens}"
            )
        if self.temperature < 0 or (self.top_p is not None and not 0 < self.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (-2 <= self.presence_penalty <= 2 and -2 <= self.frequency_penalty <= 2):
            raise ValueError("presence_penalty and frequency_penalty must be between -2 and 2")
        if self.repetition_penalty <= 0 or not 0 <= self.min_tokens <= max(self.max_new_tokens, 0):
            raise ValueError("repetition_penalty must be > 0 and min_tokens between 0 and max_new_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {value}")

    @property
    def penalizes(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def shapes_logits(self) -> bool:
        """Whether sampling reads more than the model's logits (a penalty, a bias, a minimum length)."""
        return self.penalizes or bool(self.logit_bias or self.min_tokens)


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this step, most likely first


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Literal["stop", "length", "abort"] | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    stop_logprob: TokenLogprob | None = None  # the stop token that ended it (not in token_ids), if logprobs asked
    prompt_logprobs: list[TokenLogprob] | None = None  # prompt tokens 1, 2, ... given those before, if asked


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One generation. `tokens` = prompt + output; the first `computed` have their latents in the cache, the rest
    (one, the last sampled token, while decoding) go into the next forward."""

    prompt: list[int]
    params: SamplingParams
    detokenizer: Detokenizer
    after: Sequence | None = None  # admitted only once this one has prefilled (n > 1 shares its prompt blocks)
    id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    hashed_blocks: int = 0  # how many leading blocks are registered in the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)  # digests of the registered blocks
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    admitted: bool = False
    state_slot: int = -1  # while running: its slot for state that does not grow (DeepSeek-V4's windows)
    restore_from: int | None = None  # V4, admitted on a cached prefix: the snapshot its state slot starts from
    snapshots: list[int] = field(default_factory=list)  # V4: the blocks whose snapshots it took (its first, latest)
    draft: int | None = None  # the MTP module's guess for the token after the pending one
    draft_probs: torch.Tensor | None = None  # [vocab] the distribution the draft was sampled from
    draws: int = 0  # the sampler's counter: each step's random numbers come from (seed, draws)
    finish_reason: Literal["stop", "length", "abort"] | None = None
    aborted: bool = False
    error: str | None = None  # why the engine failed it (it then finishes with "abort")
    logit_edits: LogitEdits | None = None  # its penalties' and bias's device tensors, made at its first sample
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # entry j: prompt token j + 1
    new_text: str = ""  # text produced by the last step, for streaming
    arrived: float = 0.0  # time.monotonic() when queued
    admitted_at: float | None = None  # ... when first admitted to the running batch
    first_token_at: float | None = None  # ... when its first token was sampled

    def __post_init__(self) -> None:
        self.seed = self.params.seed if self.params.seed is not None else random.getrandbits(62)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def last_token(self) -> int:
        """tokens[-1] without copying the whole sequence (a decode step reads it for every running sequence)."""
        return self.output[-1] if self.output else self.prompt[-1]

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def decoding(self) -> bool:
        """Past its prompt, with only the last sampled token to compute (a recomputed sequence prefills first)."""
        return bool(self.output) and self.length - self.computed == 1

    def completion(self) -> Completion:
        return Completion(
            list(self.output),
            self.detokenizer.text,
            self.finish_reason,
            len(self.prompt),
            self.cached_tokens,
            list(self.logprobs) if self.params.logprobs is not None else None,
            self.stop_logprob,
            list(self.prompt_logprobs) if self.params.prompt_logprobs is not None else None,
        )
