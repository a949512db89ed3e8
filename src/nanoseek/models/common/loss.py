"""The output head and its cross-entropy in one pass over chunks of tokens, never holding the [tokens, vocab] logits.

Full logits are the largest activation of a training step (1024 tokens × DeepSeek-V3's 129,280-token vocabulary is
0.5 GB in fp32, and their gradient as much again), and on a CPU each fresh allocation that size is also paid in page
faults. Here each chunk of rows computes its logits, its loss and, when a gradient is wanted, the gradients of the
hidden states and of the head weight at once (the softmax minus the one-hot target is the logits' gradient), so
backward only rescales what forward stored.
"""

from __future__ import annotations

import torch

from nanoseek.models.common.layers import linear_compute_dtype

IGNORE = -100
CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MB in fp32


def _row_chunks(rows: int, vocab: int) -> list[slice]:
    step = max(256, CHUNK_ELEMENTS // vocab)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ summed loss of the chunk, its log-normalizers [n], and which rows count [n]."""
    valid = targets != IGNORE
    log_norm = logits.logsumexp(dim=-1)
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return ((log_norm - picked) * valid).sum(), log_norm, valid


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(weight.device.type, enabled=False):
        return (hidden.to(dtype) @ weight.to(dtype).T).float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = hidden.new_zeros((), dtype=torch.float32)
        for rows in _row_chunks(hidden.shape[0], weight.shape[0]):
            h, t = hidden[rows], targets[rows]
            logits = _chunk_logits(h, weight, dtype)
            loss, log_norm, valid = _chunk_loss(logits, t)
            total += loss
            grad = logits.sub_(log_norm.unsqueeze(1)).exp_()  # the softmax, in place of the logits
            grad.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -valid.float().unsqueeze(1))  # minus the one-hot target
            grad.mul_(valid.unsqueeze(1))
            with torch.autocast(weight.device.type, enabled=False):
                grad = grad.to(dtype)
                grad_hidden[rows] = grad @ weight.to(dtype)
                if dtype == torch.float32:
                    grad_weight.addmm_(grad.T, h)
                else:
                    grad_weight += (grad.T @ h.to(dtype)).float()
        count = (targets != IGNORE).sum().clamp(min=1)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against targets (IGNORE = -100 skipped): hidden [N, dim], weight
    [vocab, dim], targets [N]. Equals F.cross_entropy(F.linear(hidden, weight).float(), targets) — computed in the
    autocast (or weight) dtype, softmax in fp32 — without ever materializing the [N, vocab] logits."""
    dtype = linear_compute_dtype(weight)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype)
    total = sum(
        _chunk_loss(_chunk_logits(hidden[rows], weight, dtype), targets[rows])[0]
        for rows in _row_chunks(hidden.shape[0], weight.shape[0])
    )
    return total / (targets != IGNORE).sum().clamp(min=1)
