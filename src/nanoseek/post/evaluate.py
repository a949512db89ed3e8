"""`nanoseek eval`: pass@1 (greedy) on a task's test (or validation) problems, with its standard error; or bits per
byte on the validation split of a corpus, which compares models whatever their tokenizers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from nanoseek.data.chat_format import encode_chat
from nanoseek.data.dataset import TokenDataset
from nanoseek.data.sources import DEFAULT, Source
from nanoseek.data.tokenizer import end_token_ids, token_byte_lengths
from nanoseek.infer.engine import Engine, EngineConfig
from nanoseek.infer.request import SamplingParams
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.post.common import load_model_dir
from nanoseek.post.tasks import Task, get_task, problems
from nanoseek.train.heldout import held_out_loss


def accuracy_on(
    model: DeepseekV3Model, tokenizer: Tokenizer, task: Task, split: str, n: int, seed: int = 0, max_tokens: int = 64
) -> dict[str, Any]:
    """pass@1, greedy, on `n` problems of the task's `split`, with its standard error and how often the layout was
    followed."""
    chosen = problems(task, split, n, seed)
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": p.question}], True)[0] for p in chosen]
    engine = Engine(model, decode=tokenizer.decode, config=EngineConfig(max_seqs=min(n, 256)))
    results = engine.generate(
        prompts, SamplingParams(max_new_tokens=max_tokens, stop_token_ids=end_token_ids(tokenizer))
    )
    rewards = [task.reward(p, r.text) for p, r in zip(chosen, results)]
    accuracy = sum(r.correct for r in rewards) / n
    return {
        "task": task.name,
        "split": split,
        "n": n,
        "accuracy": accuracy,
        "stderr": math.sqrt(accuracy * (1 - accuracy) / n),
        "format_rate": sum(r.formatted for r in rewards) / n,
        "examples": [
            {"question": p.question, "answer": p.answer, "response": r.text} for p, r in list(zip(chosen, results))[:3]
        ],
    }


def evaluate_task(
    model_dir: Path,
    task_name: str,
    n: int,
    seed: int = 0,
    max_tokens: int = 64,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    split: str = "test",
) -> dict[str, Any]:
    task = get_task(task_name)
    model, tokenizer = load_model_dir(model_dir, device, dtype)
    return accuracy_on(model.eval(), tokenizer, task, split, n, seed, max_tokens)


def evaluate_bpb(
    model_dir: Path,
    data: str | None,
    windows: int,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Bits per byte on the validation split, in windows of the model's context (train/heldout.py), the first
    `windows` of them."""
    model, tokenizer = load_model_dir(model_dir, device, dtype)
    val = TokenDataset.build([Source(data or DEFAULT)], tokenizer).sources[0].val
    loss = held_out_loss(
        model,
        val,
        token_byte_lengths(tokenizer),
        model.config.max_position_embeddings,
        batch_size=1,
        max_windows=windows,
    )
    return {"task": "bpb", "bpb": loss.bits_per_byte, "bytes": loss.bytes}
