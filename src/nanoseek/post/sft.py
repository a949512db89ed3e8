"""`nanoseek sft`: supervised fine-tuning on conversations in the chat format, loss on assistant tokens only
(V3's SFT stage, nanochat's midtraining + SFT in one). The model runs in fp32 on a CPU and under bf16 autocast on
a GPU, as pretraining does; under torchrun, data parallel (FSDP2) as pretraining is. A step's `batch_size`
conversations may be split into `grad_accum` micro-batches (the gradient is the same: each micro-batch's mean loss
is weighted by its share of the step's trained tokens) and packed several to a row (`pack`: less padding, a
document mask keeps them apart)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanoseek.data.tokenizer import end_token_ids
from nanoseek.errors import NanoseekError
from nanoseek.models.common.loss import IGNORE
from nanoseek.models.common.terms import ForwardTerms
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.parallel.collectives import clip_grad_norm
from nanoseek.parallel.setup import Parallelism, init_parallelism, parallelize
from nanoseek.post.common import PostConfig, PostRun, load_model_dir
from nanoseek.post.sft_data import (
    Conversation,
    EncodedConversations,
    batch,
    chatterbot_conversations,
    distinct,
    encode_all,
    packed_batch,
    read_conversations,
    rows_for_step,
    split_heldout,
)
from nanoseek.post.tasks import get_task, problems
from nanoseek.train.interrupt import StopRequests
from nanoseek.train.precision import autocast


def task_conversations(task_name: str, count: int, seed: int) -> list[Conversation]:
    """Worked examples of distinct problems of a task's `sft` split, in the layout its reward checks."""
    task = get_task(task_name)
    return [
        (
            f"{task_name} example {i}",
            [{"role": "user", "content": p.question}, {"role": "assistant", "content": task.demonstration(p)}],
        )
        for i, p in enumerate(problems(task, "sft", count, seed))
    ]


@torch.no_grad()
def heldout_loss(
    model: DeepseekV3Model,
    data: EncodedConversations,
    batch_size: int,
    pad_id: int,
    cfg_autocast: Any,
    par: Parallelism,
) -> float:
    """Mean loss per assistant token over every held-out conversation (each rank scores its share)."""
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, tokens
    mine = list(range(par.dp_rank, len(data), par.dp))
    for start in range(0, -(-len(data) // par.dp), batch_size):  # as many forwards on every rank (FSDP gathers)
        rows = mine[start : start + batch_size]
        inputs, targets = (t.to(device) for t in batch(data, rows or [0], pad_id))
        if not rows:  # this rank's share ran out one batch early: a forward that counts nothing
            targets.fill_(IGNORE)
        with cfg_autocast:
            out = model(inputs, targets, with_mtp=False)
        count = (targets != IGNORE).sum()
        sums += torch.stack([out.lm_loss.double() * count, count.double()]) if count else 0
    if par.distributed:
        dist.all_reduce(sums)
    return (sums[0] / sums[1].clamp(min=1)).item()


def micro_batches(
    data: EncodedConversations, rows: list[int], pad_id: int, cfg: PostConfig, pack_width: int | None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """A step's conversations (this rank's) in grad_accum micro-batches → (inputs, targets, documents or None)."""
    parts = [rows[i :: cfg.grad_accum] for i in range(cfg.grad_accum)]
    if pack_width is None:
        return [(*batch(data, part, pad_id), None) for part in parts]
    return [packed_batch(data, part, pad_id, pack_width) for part in parts]


def train_step(
    model: DeepseekV3Model,
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    device: torch.device,
    cfg_autocast: Any,
    mtp_weight: float,
    par: Parallelism | None = None,
) -> tuple[float, float | None]:
    """Forward and backward over the micro-batches, each mean loss weighted by its share of the step's trained
    tokens over all ranks (times the ranks: FSDP averages their gradients) → the step's LM loss per trained token
    and the indexer KL (V3.2) of the last micro-batch."""
    par = par or Parallelism(device=device)
    counts = torch.tensor([float((targets != IGNORE).sum()) for _, targets, _ in parts], dtype=torch.float64)
    total = counts.sum().to(device)
    if par.distributed:
        dist.all_reduce(total)
    total = max(float(total), 1.0)  # one read for the whole step
    lm_loss, kl_value = torch.zeros((), dtype=torch.float64, device=device), None
    for micro, ((inputs, targets, documents), count) in enumerate(zip(parts, counts)):
        if par.dp > 1:  # FSDP: reduce the gradients once, on the last micro-batch
            model.set_requires_gradient_sync(micro == len(parts) - 1)
        share = float(count) / total
        terms = ForwardTerms(dsa_stage="sparse")  # V3.2: its indexers keep learning, as in DSA's sparse stage
        with cfg_autocast:
            output = model(
                inputs.to(device),
                targets.to(device),
                documents=None if documents is None else documents.to(device),
                terms=terms,
            )
        loss = output.lm_loss + (mtp_weight * output.mtp_loss if output.mtp_loss is not None else 0.0)
        kl = terms.indexer_loss
        if kl is not None:  # V3.2
            loss, kl_value = loss + kl, kl.item()
        (loss * share * par.dp).backward()
        lm_loss += output.lm_loss.detach().double() * share
    if par.distributed:
        dist.all_reduce(lm_loss)
    return lm_loss.item(), kl_value


def run_sft(
    base: Path,
    out: Path,
    cfg: PostConfig,
    data: Path | None,
    task: str | None,
    task_examples: int,
    resume: bool = False,
    show_progress: bool = True,
    pack: bool = False,
) -> dict[str, Any]:
    """Under torchrun: data parallel over the processes (FSDP2), each taking its share of every step's
    conversations; the same steps as one process."""
    par = init_parallelism(None, 1)
    try:
        return _run_sft(base, out, cfg, data, task, task_examples, resume, show_progress and par.is_main, pack, par)
    finally:
        if par.distributed:
            dist.destroy_process_group()


def _run_sft(
    base: Path,
    out: Path,
    cfg: PostConfig,
    data: Path | None,
    task: str | None,
    task_examples: int,
    resume: bool,
    show_progress: bool,
    pack: bool,
    par: Parallelism,
) -> dict[str, Any]:
    schedule = cfg.schedule()
    par = dataclasses.replace(par, compute_dtype=schedule.compute_dtype(par.device))
    if cfg.batch_size < par.dp * cfg.grad_accum:
        raise NanoseekError(
            f"--batch-size {cfg.batch_size} is too small for {par.dp} processes x --grad-accum "
            f"{cfg.grad_accum}: every micro-batch needs a conversation"
        )
    run = PostRun(
        out,
        base,
        "sft",
        cfg,
        resume,
        {
            "data": str(data) if data else "chatterbot-corpus",
            "task": task,
            "task_examples": task_examples,
            "pack": pack,
        },
        par,
    )
    conversations = read_conversations(data) if data is not None else chatterbot_conversations()
    if task is not None:
        conversations += task_conversations(task, task_examples, cfg.seed)
    device = par.device
    model, tokenizer = load_model_dir(base, device)
    if pack and not model.takes_document_mask:
        raise NanoseekError("--pack needs a document mask, which DeepSeek-V4 models do not take")
    parallelize(model, par)
    train_set, held_set = split_heldout(distinct(conversations), 0.05, cfg.seed)
    context = model.config.max_position_embeddings
    train_data = encode_all(train_set, tokenizer, context, skip_long=data is None)
    held_data = encode_all(held_set, tokenizer, context, skip_long=data is None)
    pad_id = end_token_ids(tokenizer)[-1]
    if len(train_data) < par.dp * cfg.grad_accum:
        raise NanoseekError(
            f"{len(train_data)} training conversations cannot fill {par.dp} processes x --grad-accum {cfg.grad_accum}"
        )
    optimizer, start, metrics = run.start(model)
    model.train()
    bar = tqdm(
        range(start, cfg.max_steps),
        initial=start,
        total=cfg.max_steps,
        desc="sft",
        disable=None if show_progress else True,
    )  # None: shown on a terminal only
    with StopRequests(announce=par.is_main) as stop:
        for step in bar:
            lr = run.set_lr(optimizer, step)
            rows = rows_for_step(len(train_data), cfg.batch_size, cfg.seed, step)[par.dp_rank :: par.dp]
            parts = micro_batches(train_data, rows, pad_id, cfg, context if pack else None)
            loss, kl = train_step(model, parts, device, autocast(device, schedule), schedule.mtp_weight, par)
            grad_norm = clip_grad_norm(list(model.parameters()), schedule.grad_clip, par)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % cfg.log_every == 0 or done % cfg.eval_every == 0 or done == cfg.max_steps:
                row = {"step": done, "loss": loss, "lr": lr, "grad_norm": float(grad_norm)}
                if kl is not None:
                    row["indexer_kl"] = kl
                if done % cfg.eval_every == 0 or done == cfg.max_steps:
                    model.eval()
                    row["val_loss"] = heldout_loss(
                        model, held_data, cfg.batch_size, pad_id, autocast(device, schedule), par
                    )
                    model.train()
                if metrics is not None:
                    metrics.log(row)
                bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("loss", "val_loss")})
            run.end_of_step(done, model, optimizer, stop)
    model.eval()
    val = heldout_loss(model, held_data, cfg.batch_size, pad_id, autocast(device, schedule), par)
    summary = {
        "conversations": len(train_data),
        "heldout_conversations": len(held_data),
        "val_loss": val,
        "val_ppl": math.exp(min(val, 50)),
    }
    run.finish(model, tokenizer, summary)
    return summary
