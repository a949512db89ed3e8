"""`nanoseek sft`: supervised fine-tuning on conversations in the chat format, loss on assistant tokens only
(V3's SFT stage, nanochat's midtraining + SFT in one). Single process; the model runs in fp32 on a CPU and under
bf16 autocast on a GPU, as pretraining does. A step's `batch_size` conversations may be split into `grad_accum`
micro-batches (the gradient is the same: each micro-batch's mean loss is weighted by its share of the step's
trained tokens) and packed several to a row (`pack`: less padding, a document mask keeps them apart)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanoseek.data.tokenizer import end_token_ids
from nanoseek.errors import NanoseekError
from nanoseek.model.loss import IGNORE
from nanoseek.model.transformer import Transformer
from nanoseek.post.common import PostConfig, PostRun, device_for_run, load_model_dir
from nanoseek.post.sft_data import (Conversation, EncodedConversations, batch, chatterbot_conversations, distinct,
                                    encode_all, packed_batch, read_conversations, rows_for_step, split_heldout)
from nanoseek.post.tasks import get_task, problems
from nanoseek.train.dsa import indexer_loss
from nanoseek.train.interrupt import StopRequests
from nanoseek.train.precision import autocast


def task_conversations(task_name: str, count: int, seed: int) -> list[Conversation]:
    """Worked examples of distinct problems of a task's `sft` split, in the layout its reward checks."""
    task = get_task(task_name)
    return [(f"{task_name} example {i}", [{"role": "user", "content": p.question},
                                          {"role": "assistant", "content": task.demonstration(p)}])
            for i, p in enumerate(problems(task, "sft", count, seed))]


@torch.no_grad()
def heldout_loss(model: Transformer, data: EncodedConversations, batch_size: int, pad_id: int,
                 cfg_autocast: Any) -> float:
    """Mean loss per assistant token over every held-out conversation."""
    total = tokens = 0.0
    for start in range(0, len(data), batch_size):
        rows = list(range(start, min(start + batch_size, len(data))))
        inputs, targets = (t.to(next(model.parameters()).device) for t in batch(data, rows, pad_id))
        with cfg_autocast:
            out = model(inputs, targets, with_mtp=False)
        count = (targets != IGNORE).sum().item()
        total, tokens = total + out.lm_loss.item() * count, tokens + count
    return total / max(1, tokens)


def micro_batches(data: EncodedConversations, rows: list[int], pad_id: int, cfg: PostConfig,
                  pack_width: int | None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """A step's conversations in grad_accum micro-batches → (inputs, targets, documents or None) each."""
    parts = [rows[i:: cfg.grad_accum] for i in range(cfg.grad_accum)]
    if pack_width is None:
        return [(*batch(data, part, pad_id), None) for part in parts]
    return [packed_batch(data, part, pad_id, pack_width) for part in parts]


def train_step(model: Transformer, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
               device: torch.device, cfg_autocast: Any, mtp_weight: float) -> tuple[float, float | None]:
    """Forward and backward over the micro-batches, each mean loss weighted by its share of the trained tokens →
    the step's LM loss per trained token and the indexer KL (V3.2) of the last micro-batch."""
    total = sum((targets != IGNORE).sum().item() for _, targets, _ in parts)
    lm_loss, kl_value = 0.0, None
    for inputs, targets, documents in parts:
        share = (targets != IGNORE).sum().item() / max(1, total)
        with cfg_autocast:
            output = model(inputs.to(device), targets.to(device),
                           documents=None if documents is None else documents.to(device))
        loss = output.lm_loss + (mtp_weight * output.mtp_loss if output.mtp_loss is not None else 0.0)
        kl = indexer_loss(model.indexers())
        if kl is not None:  # V3.2
            loss, kl_value = loss + kl, kl.item()
        (loss * share).backward()
        lm_loss += output.lm_loss.item() * share
    return lm_loss, kl_value


def run_sft(base: Path, out: Path, cfg: PostConfig, data: Path | None, task: str | None, task_examples: int,
            resume: bool = False, show_progress: bool = True, pack: bool = False) -> dict[str, Any]:
    run = PostRun(out, base, "sft", cfg, resume, {"data": str(data) if data else "chatterbot-corpus",
                                                   "task": task, "task_examples": task_examples, "pack": pack})
    conversations = read_conversations(data) if data is not None else chatterbot_conversations()
    if task is not None:
        conversations += task_conversations(task, task_examples, cfg.seed)
    device = device_for_run()
    model, tokenizer = load_model_dir(base, device)
    if pack and model.config.attention_type == "v4":
        raise NanoseekError("--pack needs a document mask, which DeepSeek-V4 models do not take")
    train_set, held_set = split_heldout(distinct(conversations), 0.05, cfg.seed)
    context = model.config.max_position_embeddings
    train_data = encode_all(train_set, tokenizer, context, skip_long=data is None)
    held_data = encode_all(held_set, tokenizer, context, skip_long=data is None)
    pad_id = end_token_ids(tokenizer)[-1]
    optimizer, start, metrics = run.start(model)
    schedule = cfg.schedule()
    model.train()
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="sft",
               disable=None if show_progress else True)  # None: shown on a terminal only
    with StopRequests() as stop:
        for step in bar:
            lr = run.set_lr(optimizer, step)
            rows = rows_for_step(len(train_data), cfg.batch_size, cfg.seed, step)
            parts = micro_batches(train_data, rows, pad_id, cfg, context if pack else None)
            loss, kl = train_step(model, parts, device, autocast(device, schedule), schedule.mtp_weight)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % cfg.log_every == 0 or done % cfg.eval_every == 0 or done == cfg.max_steps:
                row = {"step": done, "loss": loss, "lr": lr, "grad_norm": float(grad_norm)}
                if kl is not None:
                    row["indexer_kl"] = kl
                if done % cfg.eval_every == 0 or done == cfg.max_steps:
                    model.eval()
                    row["val_loss"] = heldout_loss(model, held_data, cfg.batch_size, pad_id, autocast(device, schedule))
                    model.train()
                metrics.log(row)
                bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k in ("loss", "val_loss")})
            run.end_of_step(done, model, optimizer, stop)
    model.eval()
    val = heldout_loss(model, held_data, cfg.batch_size, pad_id, autocast(device, schedule))
    summary = {"conversations": len(train_data), "heldout_conversations": len(held_data), "val_loss": val,
               "val_ppl": math.exp(min(val, 50))}
    run.finish(model, tokenizer, summary)
    return summary
