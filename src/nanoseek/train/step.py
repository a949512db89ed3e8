"""One optimizer step, exactly as `nanoseek train` takes it: the learning rate of the step, its micro-batches from
the loader (gradient reduction on the last one only under FSDP), or the pipeline's schedule; the LM, MTP, balance
and indexer losses; expert loads summed over ranks; clipping; AdamW; the aux-loss-free bias update. Nothing in it
reads a device value back to the host: losses, the norm and the loads stay on the device, and the training loop
reads them once per logged step. tests/test_cuda.py runs this very step under CUDA's sync debug mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanoseek.models.common.terms import ForwardTerms
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.parallel.collectives import clip_grad_norm, sum_over_ranks
from nanoseek.parallel.setup import Parallelism
from nanoseek.train.balance import balance_alpha, update_expert_bias
from nanoseek.train.config import TrainConfig
from nanoseek.train.loader import BatchLoader
from nanoseek.train.optim import lr_factor
from nanoseek.train.precision import autocast

if TYPE_CHECKING:  # torch's pipelining imports dynamo (~0.8 s): only pipelined runs load it
    from nanoseek.parallel.pipeline import PipelineRunner


@dataclass
class StepResult:
    sums: torch.Tensor  # [4]: LM, MTP, balance and indexer losses, summed over micro-batches
    grad_norm: torch.Tensor
    loads: list[torch.Tensor]  # per MoE layer: tokens per expert, summed over ranks


class TrainStep:
    def __init__(
        self,
        model: DeepseekV3Model,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        par: Parallelism,
        loader: BatchLoader,
        pipeline: PipelineRunner | None = None,
        warmup: bool = False,
    ):
        self.model, self.optimizer, self.cfg, self.par = model, optimizer, cfg, par
        self.loader, self.pipeline, self.warmup = loader, pipeline, warmup
        self.balance_alpha = balance_alpha(cfg)
        self.moe_layers = model.moe_layers()
        self.accumulate_sync = par.dp > 1 and pipeline is None  # FSDP: reduce gradients on the last micro-batch

    def __call__(self, step: int) -> StepResult:
        cfg, model = self.cfg, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        for m in self.moe_layers:
            m.expert_load.zero_()
        sums = torch.zeros(4, device=self.par.device)
        if self.pipeline:
            sums[:2] = self.pipeline.train_step(*self.loader.next()[:2])
        for micro in range(cfg.grad_accum if self.pipeline is None else 0):
            if self.accumulate_sync:
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            x, y, documents = self.loader.next()  # on the device
            terms = ForwardTerms(balance_alpha=self.balance_alpha, dsa_stage=cfg.dsa)
            with autocast(self.par.device, cfg):
                result = model(x, y, documents=documents if cfg.document_mask else None, terms=terms)
            loss = result.lm_loss
            sums[0] += result.lm_loss.detach()
            if result.mtp_loss is not None:
                loss = loss + cfg.mtp_weight * result.mtp_loss
                sums[1] += result.mtp_loss.detach()
            if terms.balance_loss is not None:
                loss = loss + terms.balance_loss
                sums[2] += terms.balance_loss.detach()
            kl = terms.indexer_loss
            if kl is not None:
                loss = kl if self.warmup else loss + kl  # the warm-up's only loss: the rest of the model is frozen
                sums[3] += kl.detach()
            (loss / cfg.grad_accum).backward()
        loads = sum_over_ranks([m.expert_load.clone() for m in self.moe_layers], self.par)
        grad_norm = clip_grad_norm(list(model.parameters()), cfg.grad_clip, self.par)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.balance == "aux-free" and not self.warmup:
            update_expert_bias(self.moe_layers, loads, cfg.bias_update_speed)
        return StepResult(sums, grad_norm, loads)
