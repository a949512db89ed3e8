"""`nanoseek sft`: supervised fine-tuning on conversations in the chat format, loss on assistant tokens only
(V3's SFT stage, nanochat's midtraining + SFT in one). Single process; the model runs in fp32 on a CPU and under
bf16 autocast on a GPU, as pretraining does."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanoseek.data.tokenizer import end_token_ids
from nanoseek.model.loss import IGNORE
from nanoseek.model.transformer import Transformer
from nanoseek.post.common import PostConfig, PostRun, device_for_run, load_model_dir
from nanoseek.post.sft_data import (Conversation, EncodedConversations, batch, chatterbot_conversations,
                                    encode_all, read_conversations, rows_for_step, split_heldout)
from nanoseek.post.tasks import get_task
from nanoseek.train.dsa import indexer_loss
from nanoseek.train.interrupt import StopRequests
from nanoseek.train.precision import autocast


def task_conversations(task_name: str, count: int, seed: int) -> list[Conversation]:
    """Worked examples of a task from its training split, in the layout its reward checks."""
    task = get_task(task_name)
    return [(f"{task_name} example {i}", [{"role": "user", "content": p.question},
                                          {"role": "assistant", "content": task.demonstration(p)}])
            for i, p in enumerate(task.problems("train", count, seed))]


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


def run_sft(base: Path, out: Path, cfg: PostConfig, data: Path | None, task: str | None, task_examples: int,
            resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    run = PostRun(out, base, "sft", cfg, resume, {"data": str(data) if data else "chatterbot-corpus",
                                                   "task": task, "task_examples": task_examples})
    conversations = read_conversations(data) if data is not None else chatterbot_conversations()
    if task is not None:
        conversations += task_conversations(task, task_examples, cfg.seed)
    device = device_for_run()
    model, tokenizer = load_model_dir(base, device)
    indexers = model.indexers()
    train_set, held_set = split_heldout(conversations, 0.05, cfg.seed)
    context = model.config.max_position_embeddings
    train_data = encode_all(train_set, tokenizer, context, skip_long=data is None)
    held_data = encode_all(held_set, tokenizer, context, skip_long=data is None)
    pad_id = end_token_ids(tokenizer)[-1]
    optimizer, start, metrics = run.start(model)
    schedule = cfg.schedule()
    model.train()
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="sft",
               disable=None if show_progress else True)  # None: shown on a terminal only
    row: dict[str, Any] = {}
    with StopRequests() as stop:
        for step in bar:
            lr = run.set_lr(optimizer, step)
            inputs, targets = (t.to(device) for t in batch(train_data, rows_for_step(len(train_data), cfg.batch_size,
                                                                                     cfg.seed, step), pad_id))
            with autocast(device, schedule):
                output = model(inputs, targets)
            loss = output.lm_loss + (schedule.mtp_weight * output.mtp_loss if output.mtp_loss is not None else 0.0)
            kl = indexer_loss(indexers)
            if kl is not None:  # V3.2
                loss = loss + kl
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % cfg.log_every == 0 or done % cfg.eval_every == 0 or done == cfg.max_steps:
                row = {"step": done, "loss": output.lm_loss.item(), "lr": lr, "grad_norm": float(grad_norm)}
                if kl is not None:
                    row["indexer_kl"] = kl.item()
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
