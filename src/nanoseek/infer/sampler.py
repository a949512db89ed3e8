"""Batched sampling on the device: every row's temperature, top-k, top-p and seed applied in one pass over
[rows, vocab], with no host sync.

Randomness is counter-based: the uniform numbers of row r come from a hash (splitmix64) of (its seed, its draw
counter, a stream, the vocabulary index), so a seeded request samples the same tokens whatever else shares its batch,
and no per-row generator is needed. A token is drawn from probabilities p as argmax(p / E) with E ~ Exp(1) per
entry (the exponential race, equivalent to the Gumbel-max trick), which needs no cumulative sum and turns a one-hot
p (greedy, temperature 0) into its argmax exactly.

Speculation (Leviathan et al. 2023; Chen et al. 2023): a draft d sampled from q is kept with probability
min(1, p(d) / q(d)); when it is not, the token is drawn from the residual max(0, p − q) renormalized. The result is
distributed exactly as p. With temperature 0 both p and q are one-hot, and this is greedy verification.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN  # int64 arithmetic wraps, as the 64-bit original does
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def uniform(seeds: torch.Tensor, draws: torch.Tensor, stream: int, width: int) -> torch.Tensor:
    """[rows, width] uniform in (0, 1): a function of (seed, draw counter, stream, column) only."""
    key = _splitmix(_splitmix(seeds * 4 + stream) ^ draws)
    bits = _shift_right(_splitmix(key[:, None] + torch.arange(width, device=seeds.device)), 40)  # 24 bits
    return (bits.float() + 0.5) / float(1 << 24)


@dataclass
class RowSettings:
    """Per-row sampling settings as device tensors (rows = the sequences or tokens being sampled)."""

    temperature: torch.Tensor  # [rows] 0 = greedy
    top_k: torch.Tensor  # [rows] 0 = all
    top_p: torch.Tensor  # [rows] 1 = all
    seeds: torch.Tensor  # [rows] int64
    draws: torch.Tensor  # [rows] int64
    all_greedy: bool = False  # known on the host when the batch is built: skips the softmax
    unfiltered: bool = False  # no row has a top-k or top-p: skips the sort

    def repeat(self, times: int) -> RowSettings:
        """Each row `times` times in a row (for a sequence's several tokens)."""
        return RowSettings(
            *(t.repeat_interleave(times) for t in (self.temperature, self.top_k, self.top_p, self.seeds, self.draws)),
            self.all_greedy,
            self.unfiltered,
        )


def probabilities(logits: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """logits [rows, vocab] → the distribution each row samples from, fp32: one-hot for greedy rows, else the
    softmax at the row's temperature restricted to its top-k and then to its top-p of what top-k kept (the smallest
    set reaching p of the renormalized top-k, as vLLM and transformers apply them)."""
    logits = logits.float()
    one_hot = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    if rows.all_greedy:
        return one_hot
    greedy = rows.temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, rows.temperature)[:, None]
    if not rows.unfiltered:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)
        beyond_k = rank >= torch.where(rows.top_k > 0, rows.top_k, logits.shape[-1])[:, None]
        sorted_probs = sorted_logits.masked_fill(beyond_k, float("-inf")).softmax(dim=-1)  # top-k, renormalized
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above, within the top-k
        drop = beyond_k | (before >= rows.top_p[:, None]) & (rank > 0)
        scaled = scaled.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), float("-inf"))
    return torch.where(greedy[:, None], one_hot, scaled.softmax(dim=-1))


def draw(probs: torch.Tensor, rows: RowSettings, stream: int) -> torch.Tensor:
    """One token per row from probs [rows, vocab] (the exponential race)."""
    if rows.all_greedy:  # one-hot rows: the race's winner is known
        return probs.argmax(dim=-1)
    exponential = -uniform(rows.seeds, rows.draws, stream, probs.shape[-1]).log()
    return (probs / exponential).argmax(dim=-1)


def sample(logits: torch.Tensor, rows: RowSettings, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [rows, vocab] → a token per row, and the distribution it was drawn from (None when every row is
    greedy: then it is the one-hot of the token)."""
    if rows.all_greedy:
        return logits.argmax(dim=-1), None
    probs = probabilities(logits, rows)
    return draw(probs, rows, stream), probs


def verify(
    target_logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None, rows: RowSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """target_logits [rows, 2, vocab] at the pending token and at the draft, drafts [rows] drawn from draft_probs
    [rows, vocab] (None: all greedy) → (accepted [rows] bool, tokens [rows, 2]): the draft and the token after it
    if accepted, else the replacement (twice; the second is to be ignored)."""
    if rows.all_greedy:  # p and q one-hot: keep the draft iff it is the argmax, else the argmax replaces it
        choice = target_logits.argmax(dim=-1)
        accepted = choice[:, 0] == drafts
        return accepted, torch.stack([choice[:, 0], torch.where(accepted, choice[:, 1], choice[:, 0])], dim=1)
    target = probabilities(target_logits.flatten(0, 1), rows.repeat(2)).view(target_logits.shape)
    p, bonus_probs = target[:, 0], target[:, 1]
    p_draft = p.gather(1, drafts[:, None])[:, 0]
    q_draft = draft_probs.gather(1, drafts[:, None])[:, 0]
    accepted = uniform(rows.seeds, rows.draws, 1, 1)[:, 0] * q_draft < p_draft
    residual = (p - draft_probs).clamp(min=0)
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p)
    replacement = draw(residual, rows, 0)
    bonus = draw(bonus_probs, rows, 2)
    first = torch.where(accepted, drafts, replacement)
    return accepted, torch.stack([first, torch.where(accepted, bonus, replacement)], dim=1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """[rows, 1 + 2·top]: the chosen tokens' logprobs under the model (before temperature, as OpenAI reports), then
    the top ids and their logprobs."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])
    best = logprobs.topk(top, dim=-1) if top else None
    parts = [chosen] + ([best.indices.float(), best.values] if best is not None else [])
    return torch.cat(parts, dim=1)


@dataclass
class Penalties:
    """OpenAI's presence/frequency penalties and CTRL's repetition penalty, per row (rows = the tokens sampled)."""

    generated: torch.Tensor  # [rows, vocab] how often each token was generated so far
    seen: torch.Tensor  # [rows, vocab] bool: in the prompt or generated (repetition penalty)
    presence: torch.Tensor  # [rows]
    frequency: torch.Tensor  # [rows]
    repetition: torch.Tensor  # [rows] 1 = none

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """l − f·count − p·[count > 0]; then a seen token's logit divided by r if positive, multiplied if not."""
        logits = logits - self.frequency[:, None] * self.generated
        logits = logits - self.presence[:, None] * (self.generated > 0)
        r = self.repetition[:, None]
        return torch.where(self.seen, torch.where(logits > 0, logits / r, logits * r), logits)


@dataclass
class LogitShaping:
    """The logit edits before sampling, as device tensors; an edit no row uses is None and costs nothing (a
    [rows, vocab] mask per edit would be most of a small model's decode step)."""

    penalties: Penalties | None
    bias: torch.Tensor | None  # [rows, vocab] added
    banned: torch.Tensor | None  # [rows, vocab] bool: stop tokens before min_tokens

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The penalties, then the bias, then the bans, on fp32 logits."""
        logits = logits.float()
        if self.penalties is not None:
            logits = self.penalties.apply(logits)
        if self.bias is not None:
            logits = logits + self.bias
        return logits if self.banned is None else logits.masked_fill(self.banned, float("-inf"))


@dataclass
class LogitEdits:
    """One sequence's logit edits as device tensors, made once per request (not rebuilt from its prompt and output
    at every step, which cost a Python loop over the whole context per step and slowed the batch's every decode):
    its generated-token counts, grown by the tokens since the last step; the prompt's tokens, for the repetition
    penalty; its bias."""

    counts: torch.Tensor | None  # [vocab] float: how often each token was generated (None: no penalty)
    prompt_seen: torch.Tensor | None  # [vocab] bool: in the prompt (None: no repetition penalty)
    bias: torch.Tensor | None  # [vocab] added to the logits (None: no logit_bias)
    counted: int = 0  # how many of the sequence's output tokens `counts` holds

    @staticmethod
    def build(
        prompt: list[int],
        penalizes: bool,
        repetition: bool,
        bias: tuple[tuple[int, float], ...],
        vocab: int,
        device: torch.device,
    ) -> LogitEdits:
        counts = torch.zeros(vocab, device=device) if penalizes else None
        seen = None
        if repetition:
            seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            seen[torch.tensor(prompt, device=device)] = True
        added = None
        if bias:
            added = torch.zeros(vocab, device=device)
            added.index_put_(
                (torch.tensor([t for t, _ in bias], device=device),),
                torch.tensor([v for _, v in bias], device=device),
                accumulate=True,
            )
        return LogitEdits(counts, seen, added)

    def catch_up(self, output: list[int]) -> None:
        """Counts the output tokens sampled since the last call."""
        if self.counts is not None and len(output) > self.counted:
            new = torch.tensor(output[self.counted :], device=self.counts.device)
            self.counts.index_add_(0, new, torch.ones(len(new), device=self.counts.device))
        self.counted = len(output)
