"""What a training forward is told beside its inputs, and the auxiliary losses its layers give back.

One ForwardTerms goes down the layers as an argument and comes back to the caller (in ModelOutput.terms, or the
caller's own object for a forward that returns logits): the losses are values of the forward, never state kept on
a module between calls. They are running sums, not lists: a compiled block guards on what it reads of its inputs,
and a list's length would differ at every layer (one recompilation each), a sum only between the first layer that
adds and the others.
"""

from __future__ import annotations

from typing import Literal

import torch


class ForwardTerms:
    """Not a dataclass on purpose: FSDP2 rebuilds the dataclasses among a forward's arguments to cast the tensors
    in them, and what a block then added would go to the copy."""

    def __init__(
        self,
        balance_alpha: float = 0.0,
        dsa_stage: Literal["warmup", "sparse"] | None = None,
        inject_balance: bool = False,
    ):
        self.balance_alpha = balance_alpha  # > 0: MoE layers add V3's sequence-wise balance loss, scaled by it
        self.dsa_stage = dsa_stage  # the DSA stage the indexers learn in (None: they do not)
        self.inject_balance = inject_balance  # give the balance losses their gradient in backward (a pipeline)
        self.balance_loss: torch.Tensor | None = None  # the sum over the MoE layers that ran
        self.indexer_kl_sum: torch.Tensor | None = None  # over the indexers that learned (MTP modules' too)
        self.indexers_learned: torch.Tensor | None = None  # how many: a tensor, so that no compiled block guards on it

    def add_balance(self, loss: torch.Tensor) -> None:
        self.balance_loss = loss if self.balance_loss is None else self.balance_loss + loss

    def add_indexer_kl(self, kl: torch.Tensor) -> None:
        one = torch.ones((), dtype=kl.dtype, device=kl.device)
        self.indexer_kl_sum = kl if self.indexer_kl_sum is None else self.indexer_kl_sum + kl
        self.indexers_learned = one if self.indexers_learned is None else self.indexers_learned + one

    def indexer_stage(self, training: bool) -> tuple[str | None, bool]:
        """DSA's stage for an indexer in a module of this training mode (None outside training), and whether the
        indexer learns in this forward (a stage, and autograd on): what V3.2's and V4's attention both ask."""
        stage = self.dsa_stage if training else None
        return stage, stage is not None and torch.is_grad_enabled()

    @property
    def indexer_loss(self) -> torch.Tensor | None:
        """The mean KL over the indexers that learned, or None."""
        return None if self.indexer_kl_sum is None else self.indexer_kl_sum / self.indexers_learned
