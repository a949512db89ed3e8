"""Pipeline parallelism with torch.distributed.pipelining: the layers split into stages, run by a selectable
schedule (GPipe, 1F1B, Interleaved1F1B, ZBV zero-bubble, DualPipeV).

Each rank keeps a pruned copy of the whole model (blocks of other stages become Identity, embedding/head/MTP only
where they run), so parameter names, and so DCP checkpoint keys, stay those of the single-device model: a pipelined
run resumes on one process and the reverse. The raw token embeddings travel with the hidden states to the last
stage, where the MTP modules read them (embedding and head stay shared, not copied).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from nanoseek.errors import ConfigError
from nanoseek.models.common.terms import ForwardTerms
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.parallel.setup import Parallelism, shard_blocks, shard_experts

# name → (schedule class, stages per rank, V-shaped placement: rank r holds stages r and 2·pp-1-r)
SCHEDULES = {
    "gpipe": (ScheduleGPipe, 1, False),
    "1f1b": (Schedule1F1B, 1, False),
    "interleaved1f1b": (ScheduleInterleaved1F1B, 2, False),
    "zbv": (ScheduleZBVZeroBubble, 2, True),
    "dualpipev": (ScheduleDualPipeV, 2, True),
}


class StageModule(nn.Module):
    """One stage: registers only its own modules (shared objects with the pruned model), since the schedule scales
    and syncs the gradients of a stage's parameters, which must not include another stage's on the same rank."""

    def __init__(self, model: DeepseekV3Model, layers: list[int], first: bool, last: bool, balance_alpha: float):
        super().__init__()
        self.first, self.last = first, last
        # the schedule owns the loss: balance losses ride on the activations' gradients
        self.terms = ForwardTerms(balance_alpha=balance_alpha, inject_balance=True)
        self.rope = model.rope
        self.blocks = nn.ModuleList(model.layers[i] for i in layers)
        self.embed = model.embed if first else None
        self.norm, self.head, self.mtp = (model.norm, model.head, model.mtp) if last else (None, None, None)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.first:
            x = self.embed(inputs[0])
            embeddings = x.clone()  # a separate output: the MTP modules' token embeddings
        else:
            x, embeddings = inputs
        T = x.shape[1]
        cos, sin = self.rope(torch.arange(T, device=x.device))
        for block in self.blocks:
            x = block(x, cos, sin, terms=self.terms)
        if not self.last:
            return x, embeddings
        outputs, hidden = [self.head(self.norm(x))], x
        for k, module in enumerate(self.mtp, start=1):  # as DeepseekV3Model._mtp_loss: depth k reads t_{i+k}
            hidden = module(hidden[:, : T - k], embeddings[:, k:], cos[: T - k], sin[: T - k], terms=self.terms)
            outputs.append(self.head(module.norm(hidden)))
        return tuple(outputs)


def _keep_loads_through_shape_inference(stage: PipelineStage, model: DeepseekV3Model) -> None:
    """The schedule infers stage shapes by running the stage on placeholder data, at its first step and at every
    switch between training and evaluation. Routing those placeholders must not count as expert load (the
    balancing bias would chase it), so the counters are restored around that pass. (A private hook of
    torch.distributed.pipelining; tests/test_distributed.py compares pipelined and single-process losses.)"""
    infer = stage._forward_metadata_inference

    def counted_as_nothing(*args, **kwargs):
        loads = [m.expert_load.clone() for m in model.moe_layers()]
        try:
            return infer(*args, **kwargs)
        finally:
            for m, load in zip(model.moe_layers(), loads):
                m.expert_load.copy_(load)

    stage._forward_metadata_inference = counted_as_nothing


def stage_indices(rank: int, pp: int, schedule: str) -> list[int]:
    _, per_rank, v_shape = SCHEDULES[schedule]
    if per_rank == 1:
        return [rank]
    return [rank, 2 * pp - 1 - rank] if v_shape else [rank, rank + pp]


def build_pipeline(
    model: DeepseekV3Model,
    rank: int,
    pp: int,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable,
    device: torch.device,
    group=None,
    shard: Callable[[list[nn.Module]], None] | None = None,
    balance_alpha: float = 0.0,
) -> tuple[object, list[int]]:
    """Prunes `model` in place to this rank's stages; → (schedule, this rank's stage indices)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if model.config.tie_word_embeddings:
        raise ConfigError(
            "pipeline parallelism needs untied embeddings (the head and embedding sit on different stages)"
        )
    cls, per_rank, _ = SCHEDULES[schedule]
    n_stages = pp * per_rank
    n_layers = model.config.num_hidden_layers
    if n_layers < n_stages:
        raise ConfigError(f"{n_layers} layers cannot fill {n_stages} pipeline stages")
    bounds = [round(s * n_layers / n_stages) for s in range(n_stages + 1)]
    mine = stage_indices(rank, pp, schedule)
    owned = {i for s in mine for i in range(bounds[s], bounds[s + 1])}
    for i in range(n_layers):
        if i not in owned:
            model.layers[i] = nn.Identity()
    if 0 not in mine:
        model.embed = None
    if n_stages - 1 not in mine:
        model.norm, model.head, model.mtp = None, None, nn.ModuleList()
    modules = [
        StageModule(model, list(range(bounds[s], bounds[s + 1])), s == 0, s == n_stages - 1, balance_alpha)
        for s in mine
    ]
    if shard is not None:  # expert parallelism and FSDP over the data-parallel ranks of the stage, still on meta
        shard(modules)
    model.to_empty(device=device)  # only this rank's shards: the caller initializes or loads the weights afterwards
    stages = [PipelineStage(module, s, n_stages, device, group=group) for module, s in zip(modules, mine)]
    for stage in stages:
        _keep_loads_through_shape_inference(stage, model)
    try:
        runner = cls(stages[0] if per_rank == 1 else stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    except ValueError as e:  # e.g. too few micro-batches for the stages
        raise ConfigError(
            f"pipeline schedule {schedule!r}: {e} (micro-batches are the sequences each "
            "data-parallel rank trains on per step: raise train.batch_size)"
        ) from None
    return runner, mine


def pipeline_loss(mtp_weight: float, record: list[torch.Tensor]) -> Callable:
    """The last stage's loss: LM cross-entropy + λ · mean MTP cross-entropy; records both per micro-batch as a
    detached [2] tensor on the device (no host sync)."""

    def loss_fn(outputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
        logits, *mtp = outputs
        lm = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        if not mtp:
            record.append(torch.stack([lm.detach(), torch.zeros_like(lm)]))
            return lm
        mtp_loss = torch.stack(
            [
                F.cross_entropy(m.flatten(0, 1).float(), target[:, k:].flatten(), ignore_index=-100)
                for k, m in enumerate(mtp, start=1)
            ]
        ).mean()
        record.append(torch.stack([lm, mtp_loss]).detach())
        return lm + mtp_weight * mtp_loss

    return loss_fn


class PipelineRunner:
    """Feeds the schedule: the first stage gets the tokens, the last the targets; the losses its loss function
    records on the last stage's rank are summed over all ranks so that every rank (rank 0 logs) knows them."""

    def __init__(
        self, model: DeepseekV3Model, par: Parallelism, batch_size: int, mtp_weight: float, balance_alpha: float
    ):
        self.record: list[torch.Tensor] = []
        self.device, self.n_microbatches, self.dp = par.device, batch_size, par.dp  # a sequence per micro-batch
        shard = None
        if par.dp > 1:

            def shard(modules: list[StageModule]) -> None:
                shard_experts(model, par)  # this rank's pruned model: only its stages' MoE layers
                for module in modules:  # each block, then each stage as a root
                    shard_blocks([*module.blocks, *(m.block for m in module.mtp or [])], module, par)

        pp, schedule = par.pp, par.pp_schedule
        self.schedule, stages = build_pipeline(
            model,
            par.pp_rank,
            pp,
            schedule,
            batch_size,
            pipeline_loss(mtp_weight, self.record),
            par.device,
            par.pp_group,
            shard,
            balance_alpha,
        )
        self.first, self.last = 0 in stages, SCHEDULES[schedule][1] * pp - 1 in stages
        self.model, self.v_shaped = model, SCHEDULES[schedule][2]

    def _run(self, method: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """→ [LM loss, MTP loss] of the whole global batch, on the device, on every rank."""
        self.record.clear()
        method(*([x.to(self.device)] if self.first else []), target=y.to(self.device) if self.last else None, losses=[])
        real = self.record[-self.n_microbatches :]  # earlier entries: a shape-inference pass
        totals = (torch.stack(real).mean(dim=0) if real else torch.zeros(2, device=self.device)).float()
        torch.distributed.all_reduce(totals)  # only the last stage's ranks contribute, one per data-parallel rank
        return totals / self.dp

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._run(self.schedule.step, x, y)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.v_shaped:
            with torch.no_grad():
                return self._run(self.schedule.eval, x, y)[0]
        # torch 2.13's eval() of the V-shaped schedules (ZBV, DualPipeV) still plans backward actions and fails;
        # a training step whose gradients are thrown away gives the same loss
        with torch.enable_grad():
            loss = self._run(self.schedule.step, x, y)[0]
        self.model.zero_grad(set_to_none=True)
        return loss
