"""Auxiliary-loss-free load balancing (V3 §2.1.2) and the expert-load imbalance it is judged by."""

from __future__ import annotations

from collections import deque

import torch

from nanoseek.models.common.moe import MoE, Router
from nanoseek.train.config import TrainConfig


@torch.no_grad()
def update_expert_bias(moe_layers: list[MoE], loads: list[torch.Tensor], speed: float) -> None:
    """After a step: each expert's bias moves by γ against the sign of its load error (overloaded experts become
    less attractive, underloaded ones more). `loads` are the tokens each expert got over the whole step. A hash-routed
    layer (V4) has no bias: its experts are fixed per token."""
    for moe, load in zip(moe_layers, loads):
        if isinstance(moe.router, Router):
            moe.router.expert_bias += speed * torch.sign(load.mean() - load)


class ImbalanceTracker:
    """max/mean routed load per MoE layer over a window of steps, averaged over layers (1.0 = perfectly even)."""

    def __init__(self, n_layers: int, window: int = 100):
        self.history: deque[torch.Tensor] = deque(maxlen=window)
        self.n_layers = n_layers

    def add(self, loads: list[torch.Tensor]) -> None:
        self.history.append(torch.stack(loads))

    def last(self) -> float:
        return self._ratio(self.history[-1]) if self.history else float("nan")

    def window(self) -> float:
        return self._ratio(torch.stack(list(self.history)).sum(0)) if self.history else float("nan")

    @staticmethod
    def _ratio(loads: torch.Tensor) -> float:
        """loads [layers, experts]"""
        return (loads.amax(dim=1) / loads.mean(dim=1).clamp(min=1e-9)).mean().item()


def balance_alpha(cfg: TrainConfig) -> float:
    """The sequence-wise balance loss's α for the run's balancing mode (a forward's ForwardTerms.balance_alpha)."""
    return {"aux-free": cfg.seq_aux_alpha, "aux-loss": cfg.aux_loss_alpha, "none": 0.0}[cfg.balance]
