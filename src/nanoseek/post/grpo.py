"""`nanoseek rl`: GRPO (DeepSeekMath §4.1, R1) with rule-based rewards.

Each step: B prompts from the task's training split, G responses each sampled by nanoseek's own batched engine
(rollouts are RL's bottleneck), rewards from the task's rule, and group-relative advantages
A = (r − mean_group) / (std_group + ε). The policy then takes `minibatches` optimizer steps over the rollouts with
PPO's clipped objective against the rollout-time log-probabilities (so the ratio moves off 1 from the second
minibatch on), optionally minus β·KL(π ‖ π_ref) to the frozen starting model with the k3 estimator
exp(ref − logp) − (ref − logp) − 1. Losses are averaged per response then over responses (GRPO), or over all
response tokens at once (`token_mean`: DAPO / Dr.GRPO, which does not favour short responses).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoseek.data.chat_format import encode_chat
from nanoseek.data.tokenizer import end_token_ids
from nanoseek.infer.engine import Engine, EngineConfig
from nanoseek.infer.request import SamplingParams
from nanoseek.model.transformer import Transformer
from nanoseek.post.common import PostConfig, PostRun, device_for_run, load_model_dir
from nanoseek.post.tasks import Task, get_task
from nanoseek.train.dsa import indexer_loss
from nanoseek.train.interrupt import StopRequests
from nanoseek.train.precision import autocast


@dataclass(frozen=True)
class GrpoConfig:
    group_size: int = 8  # G
    clip: float = 0.2  # ε
    kl_beta: float = 0.0  # β; 0 = no reference model
    token_mean: bool = False  # DAPO / Dr.GRPO normalization
    scale_by_std: bool = True  # Dr.GRPO drops the division by the group's std
    minibatches: int = 2
    max_response_tokens: int = 64
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError("--group-size must be at least 2: advantages are relative to the group")
        if not 0 < self.clip < 1 or self.kl_beta < 0 or self.minibatches < 1 or self.max_response_tokens < 1:
            raise ValueError("--clip must lie in (0, 1), --kl-beta >= 0, --minibatches and --max-response-tokens >= 1")
        if not self.temperature > 0:
            raise ValueError("--temperature must be positive: GRPO needs varied samples")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True) -> torch.Tensor:
    """rewards [B·G] (groups consecutive) → advantages [B·G]."""
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centered = centered / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centered.flatten()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              cfg: GrpoConfig, ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logp, old_logp, ref_logp, mask [N, T] (mask: response tokens), advantages [N] → loss, statistics."""
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    clipped = ratio.clamp(1 - cfg.clip, 1 + cfg.clip)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = delta.exp() - delta - 1
        per_token = per_token + cfg.kl_beta * kl
    mask = mask.float()
    if cfg.token_mean:
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    was_clipped = ((ratio - clipped).abs() > 0) & (torch.sign(ratio - 1) == torch.sign(adv)) & (mask > 0)
    stats = {"kl": (kl * mask).sum() / mask.sum().clamp(min=1),
             "clip_fraction": was_clipped.float().sum() / mask.sum().clamp(min=1)}
    return loss, stats


@dataclass
class Rollouts:
    inputs: torch.Tensor  # [N, T] prompt + response, right-padded
    targets: torch.Tensor  # [N, T] the next token
    mask: torch.Tensor  # [N, T] True where the target is a response token
    old_logp: torch.Tensor  # [N, T] rollout-time log-probabilities of the targets (0 elsewhere)
    rewards: torch.Tensor  # [N]
    correct: torch.Tensor  # [N]
    lengths: torch.Tensor  # [N] response tokens


def rollout(model: Transformer, tokenizer: Any, task: Task, step: int, prompts: int, cfg: GrpoConfig,
            seed: int) -> Rollouts:
    problems = task.problems("train", prompts * (step + 1), seed)[-prompts:]  # fresh problems every step
    stops = end_token_ids(tokenizer)
    engine = Engine(model.eval(), decode=tokenizer.decode, config=EngineConfig(
        speculation=False, max_seqs=prompts * cfg.group_size, token_budget=max(512, prompts * cfg.group_size * 2)))
    prompt_ids = [encode_chat(tokenizer, [{"role": "user", "content": p.question}], True)[0] for p in problems]
    params = [SamplingParams(max_new_tokens=cfg.max_response_tokens, temperature=cfg.temperature,
                             seed=seed * 1_000_003 + step * 10_007 + i, stop_token_ids=stops, logprobs=0)
              for i in range(prompts * cfg.group_size)]
    requests = [ids for ids in prompt_ids for _ in range(cfg.group_size)]
    results = engine.generate(requests, params)
    sequences, logps, rewards, correct, lengths = [], [], [], [], []
    for i, (ids, result) in enumerate(zip(requests, results)):
        entries = result.logprobs + ([result.stop_logprob] if result.stop_logprob else [])
        response = [e.token for e in entries]
        sequences.append((ids, response))
        logps.append([e.logprob for e in entries])
        reward = task.reward(problems[i // cfg.group_size], result.text)
        rewards.append(reward.value)
        correct.append(reward.correct)
        lengths.append(len(response))
    width = max(len(p) + len(r) for p, r in sequences) - 1
    inputs = torch.full((len(sequences), width), stops[-1], dtype=torch.long)
    targets = torch.zeros_like(inputs)
    mask = torch.zeros_like(inputs, dtype=torch.bool)
    old_logp = torch.zeros(inputs.shape)
    for row, ((prompt, response), logp) in enumerate(zip(sequences, logps)):
        full = torch.tensor(prompt + response)
        n = len(full) - 1
        inputs[row, :n], targets[row, :n] = full[:-1], full[1:]
        mask[row, len(prompt) - 1: n] = True
        old_logp[row, len(prompt) - 1: n] = torch.tensor(logp)
    return Rollouts(inputs, targets, mask, old_logp, torch.tensor(rewards), torch.tensor(correct, dtype=torch.float),
                    torch.tensor(lengths, dtype=torch.float))


def token_logprobs(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(inputs).float(), dim=-1).gather(2, targets[..., None])[..., 0]


def run_rl(source: Path, out: Path, task_name: str, cfg: PostConfig, grpo: GrpoConfig, resume: bool = False,
           show_progress: bool = True) -> dict[str, Any]:
    task = get_task(task_name)
    run = PostRun(out, source, "rl", cfg, resume, {"task": task_name, **grpo.__dict__})
    device = device_for_run()
    model, tokenizer = load_model_dir(source, device)
    indexers = model.indexers()
    reference = copy.deepcopy(model).eval().requires_grad_(False) if grpo.kl_beta > 0 else None
    optimizer, start, metrics = run.start(model)
    schedule = cfg.schedule()
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="rl",
               disable=None if show_progress else True)  # None: shown on a terminal only
    with StopRequests() as stop:
        for step in bar:
            lr = run.set_lr(optimizer, step)
            batch = rollout(model, tokenizer, task, step, cfg.batch_size, grpo, cfg.seed)
            advantages = group_advantages(batch.rewards, grpo.group_size, grpo.scale_by_std)
            model.train()
            stats: dict[str, float] = {"kl": 0.0, "clip_fraction": 0.0}
            order = torch.randperm(len(advantages), generator=torch.Generator().manual_seed(cfg.seed + step))
            for part in order.chunk(grpo.minibatches):
                inputs, targets = batch.inputs[part].to(device), batch.targets[part].to(device)
                with autocast(device, schedule):
                    logp = token_logprobs(model, inputs, targets)
                    ref_logp = None
                    if reference is not None:
                        with torch.no_grad():
                            ref_logp = token_logprobs(reference, inputs, targets)
                loss, part_stats = grpo_loss(logp, batch.old_logp[part].to(device), advantages[part].to(device),
                                             batch.mask[part].to(device), grpo, ref_logp)
                kl = indexer_loss(indexers)
                if kl is not None:  # V3.2: its indexers keep learning where the policy now attends
                    loss = loss + kl
                    part_stats["indexer_kl"] = kl.detach()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for name, value in part_stats.items():
                    stats[name] = stats.get(name, 0.0) + value.item() / grpo.minibatches
            done = step + 1
            row = {"step": done, "reward": batch.rewards.mean().item(), "accuracy": batch.correct.mean().item(),
                   "response_tokens": batch.lengths.mean().item(), "kl": stats["kl"],
                   "clip_fraction": stats["clip_fraction"], "lr": lr}
            if "indexer_kl" in stats:
                row["indexer_kl"] = stats["indexer_kl"]
            metrics.log(row)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()
                             if k in ("reward", "accuracy", "kl", "clip_fraction")})
            run.end_of_step(done, model, optimizer, stop)
    rows = metrics.rows()[-10:]
    summary = {"final_reward": sum(r["reward"] for r in rows) / max(1, len(rows)),
               "final_accuracy": sum(r["accuracy"] for r in rows) / max(1, len(rows))}
    model.eval()
    run.finish(model, tokenizer, summary)
    return summary

