"""Sampling from a model: temperature, top-k, top-p (nucleus), seeded. Recomputes the whole window each token; the
latent-cache engine of the inference work replaces this for speed."""

from __future__ import annotations

import torch

from nanoseek.model.transformer import Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, vocab] → next ids [B]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = None, seed: int | None = None,
             stop_id: int | None = None) -> list[int]:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    window = model.config.max_position_embeddings
    ids = torch.tensor([prompt_ids], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -window:])[:, -1]
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if stop_id is not None and token.item() == stop_id:
            break
        new.append(token.item())
        ids = torch.cat([ids, token[:, None]], dim=1)
    return new
