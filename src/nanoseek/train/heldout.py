"""Bits per byte on a whole held-out split: every token predicted once, in consecutive windows of the training
length. Unlike the trainer's sampled validation loss, it is exact, and it does not depend on the tokenizer: a loss
per token is a loss per byte once divided by how many bytes the tokens stand for."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nanoseek.data.dataset import TokenShards
from nanoseek.models.deepseek_v3.model import DeepseekV3Model


@dataclass(frozen=True)
class HeldOutLoss:
    nats: float  # summed cross-entropy of every predicted token
    tokens: int
    bytes: int  # of text the predicted tokens stand for

    @property
    def nats_per_token(self) -> float:
        return self.nats / self.tokens

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes


@torch.no_grad()
def held_out_loss(
    model: DeepseekV3Model,
    split: TokenShards,
    byte_lengths: np.ndarray,
    seq_len: int,
    batch_size: int = 32,
    max_windows: int | None = None,
) -> HeldOutLoss:
    """Each window predicts tokens [s+1, s+seq_len] from [s, s+seq_len−1]; windows start every seq_len tokens, so
    each token of the split (but the first) is a target exactly once, with the context a training window has.
    `max_windows`: only the split's first windows (a smoke test's quick measure)."""
    device = next(model.parameters()).device
    starts = list(range(0, len(split) - 1, seq_len))[:max_windows]
    was_training = model.training
    model.eval()
    nats, tokens, size = 0.0, 0, 0
    for begin in range(0, len(starts), batch_size):
        # the last window may be short: batch it alone rather than pad
        group = starts[begin : begin + batch_size]
        lengths = [min(seq_len, len(split) - 1 - s) for s in group]
        for length in sorted(set(lengths)):
            rows = np.stack([split.read(s, length + 1) for s, n in zip(group, lengths) if n == length])
            x = torch.from_numpy(rows[:, :-1]).to(device)
            y = torch.from_numpy(rows[:, 1:]).to(device)
            logits = model(x)
            nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            tokens += y.numel()
            size += int(byte_lengths[rows[:, 1:]].sum())
    model.train(was_training)
    if not tokens or not size:
        raise ValueError("the held-out split is too small to measure (no predicted token, or no byte of text)")
    return HeldOutLoss(nats=nats, tokens=tokens, bytes=size)
