"""`nanoseek rl`: GRPO (DeepSeekMath §4.1, R1) with rule-based rewards.

Each step: B prompts from the task's `rl` split (disjoint from SFT's examples), G responses each sampled by
nanoseek's own batched engine at the run's temperature (rollouts are RL's bottleneck), rewards from the task's rule,
and group-relative advantages A = (r − mean_group) / (std_group + ε). Groups whose responses all earned the same
reward carry no signal (A = 0) and are skipped (DAPO's dynamic sampling, without resampling). The policy then
takes `minibatches` optimizer steps over the rest with PPO's clipped objective, optionally minus β·KL(π ‖ π_ref) to
the frozen starting model with the k3 estimator exp(ref − logp) − (ref − logp) − 1. Losses are averaged per response
then over responses (GRPO), or over all response tokens at once (`token_mean`: DAPO / Dr.GRPO).

Every log-probability is of the distribution the responses were sampled from, log_softmax(logits / temperature),
and the "old" ones are recomputed by the training forward itself (same precision, same minibatch) before the first
update: the ratio is exactly 1 on the first minibatch, whatever the rollout engine's precision (a rollout in fp32
against a bf16 training forward would start off-policy, and the clip would fire on rounding alone).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanoseek.data.chat_format import encode_chat
from nanoseek.data.tokenizer import end_token_ids
from nanoseek.errors import NanoseekError
from nanoseek.infer.engine import Engine, EngineConfig
from nanoseek.infer.request import SamplingParams
from nanoseek.models.common.terms import ForwardTerms
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.post.common import PostConfig, PostRun, device_for_run, load_model_dir
from nanoseek.post.evaluate import accuracy_on
from nanoseek.post.tasks import Task, get_task, problems
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


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GrpoConfig,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
    stats = {
        "kl": (kl * mask).sum() / mask.sum().clamp(min=1),
        "clip_fraction": was_clipped.float().sum() / mask.sum().clamp(min=1),
    }
    return loss, stats


@dataclass
class Rollouts:
    inputs: torch.Tensor  # [N, T] prompt + response, right-padded
    targets: torch.Tensor  # [N, T] the next token
    mask: torch.Tensor  # [N, T] True where the target is a response token
    rewards: torch.Tensor  # [N]
    correct: torch.Tensor  # [N]
    lengths: torch.Tensor  # [N] response tokens


def rollout(
    model: DeepseekV3Model, tokenizer: Any, task: Task, step: int, prompts: int, cfg: GrpoConfig, seed: int
) -> Rollouts:
    chosen = problems(task, "rl", prompts, f"{seed}/{step}")  # a fresh draw of the rl split every step
    stops = end_token_ids(tokenizer)
    engine = Engine(
        model.eval(),
        decode=tokenizer.decode,
        config=EngineConfig(
            speculation=False, max_seqs=prompts * cfg.group_size, token_budget=max(512, prompts * cfg.group_size * 2)
        ),
    )
    prompt_ids = [encode_chat(tokenizer, [{"role": "user", "content": p.question}], True)[0] for p in chosen]
    # logprobs=0 only to learn which stop token ended a response: it is trained on too
    params = [
        SamplingParams(
            max_new_tokens=cfg.max_response_tokens,
            temperature=cfg.temperature,
            seed=seed * 1_000_003 + step * 10_007 + i,
            stop_token_ids=stops,
            logprobs=0,
        )
        for i in range(prompts * cfg.group_size)
    ]
    requests = [ids for ids in prompt_ids for _ in range(cfg.group_size)]
    results = engine.generate(requests, params)
    sequences, rewards, correct = [], [], []
    for i, (ids, result) in enumerate(zip(requests, results)):
        sequences.append((ids, result.token_ids + ([result.stop_logprob.token] if result.stop_logprob else [])))
        reward = task.reward(chosen[i // cfg.group_size], result.text)
        rewards.append(reward.value)
        correct.append(reward.correct)
    width = max(len(p) + len(r) for p, r in sequences) - 1
    inputs = torch.full((len(sequences), width), stops[-1], dtype=torch.long)
    targets = torch.zeros_like(inputs)
    mask = torch.zeros_like(inputs, dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        full = torch.tensor(prompt + response)
        n = len(full) - 1
        inputs[row, :n], targets[row, :n] = full[:-1], full[1:]
        mask[row, len(prompt) - 1 : n] = True
    return Rollouts(
        inputs,
        targets,
        mask,
        torch.tensor(rewards),
        torch.tensor(correct, dtype=torch.float),
        torch.tensor([len(r) for _, r in sequences], dtype=torch.float),
    )


def token_logprobs(
    model: DeepseekV3Model,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    terms: ForwardTerms | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """→ log-probabilities of the targets [N, T] and the entropy at each position [N, T] (without gradient), both
    of the tempered distribution softmax(logits / temperature) the rollouts sampled from."""
    logp = F.log_softmax(model(inputs, terms=terms).float() / temperature, dim=-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(dim=-1)
    return logp.gather(2, targets[..., None])[..., 0], entropy


def informative_rows(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The rows [N] of groups whose rewards differ: a group of equal rewards has zero advantages, so no gradient
    (with a KL term, only its pull back to the reference)."""
    groups = rewards.view(-1, group_size)
    varied = groups.max(dim=1).values > groups.min(dim=1).values
    return varied.repeat_interleave(group_size).nonzero().flatten()


def policy_update(
    model: DeepseekV3Model,
    reference: DeepseekV3Model | None,
    optimizer: torch.optim.Optimizer,
    batch: Rollouts,
    grpo: GrpoConfig,
    cfg: PostConfig,
    step: int,
) -> dict[str, float]:
    """The minibatch updates of one step over the informative groups → mean statistics (empty if none)."""
    device, schedule = next(model.parameters()).device, cfg.schedule()
    advantages = group_advantages(batch.rewards, grpo.group_size, grpo.scale_by_std)
    rows = informative_rows(batch.rewards, grpo.group_size)
    if not len(rows):
        return {}
    order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + step))]
    parts = [
        (batch.inputs[p].to(device), batch.targets[p].to(device), batch.mask[p].to(device), advantages[p].to(device))
        for p in order.chunk(grpo.minibatches)
    ]
    model.train()
    with torch.no_grad(), autocast(device, schedule):  # the old policy, by the very forward that trains it
        old = [token_logprobs(model, inputs, targets, grpo.temperature)[0] for inputs, targets, _, _ in parts]
    stats: dict[str, float] = {}
    for (inputs, targets, mask, adv), old_logp in zip(parts, old):
        with autocast(device, schedule):
            terms = ForwardTerms(dsa_stage="sparse")  # V3.2: its indexers keep learning, as in DSA's sparse stage
            logp, entropy = token_logprobs(model, inputs, targets, grpo.temperature, terms)
            ref_logp = None
            if reference is not None:
                with torch.no_grad():
                    ref_logp = token_logprobs(reference, inputs, targets, grpo.temperature)[0]
        loss, part_stats = grpo_loss(logp, old_logp, adv, mask, grpo, ref_logp)
        part_stats["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        kl = terms.indexer_loss
        if kl is not None:  # V3.2: its indexers keep learning where the policy now attends
            loss = loss + kl
            part_stats["indexer_kl"] = kl.detach()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, value in part_stats.items():
            stats[name] = stats.get(name, 0.0) + value.item() / len(parts)
    stats["trained_fraction"] = len(rows) / len(advantages)
    return stats


def run_rl(
    source: Path,
    out: Path,
    task_name: str,
    cfg: PostConfig,
    grpo: GrpoConfig,
    resume: bool = False,
    show_progress: bool = True,
    validation: int = 0,
) -> dict[str, Any]:
    """`validation` > 0: every eval_every steps, pass@1 (greedy) on that many problems of the task's validation
    split is logged and the model saved under OUT/steps/STEP (a run's step count is then chosen on validation)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NanoseekError(
            "nanoseek rl runs in one process (its rollouts and updates are not data-parallel yet): "
            "run it without torchrun"
        )
    task = get_task(task_name)
    run = PostRun(out, source, "rl", cfg, resume, {"task": task_name, **grpo.__dict__, "validation": validation})
    device = device_for_run()
    model, tokenizer = load_model_dir(source, device)
    # RL never trains the MTP modules: frozen, they have no optimizer state either when a checkpoint is saved or
    # when one is loaded (loading builds state for every parameter that requires grad, and DCP then asks for it)
    model.mtp.requires_grad_(False)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if grpo.kl_beta > 0 else None
    optimizer, start, metrics = run.start(model)
    bar = tqdm(
        range(start, cfg.max_steps),
        initial=start,
        total=cfg.max_steps,
        desc="rl",
        disable=None if show_progress else True,
    )  # None: shown on a terminal only
    with StopRequests() as stop:
        for step in bar:
            lr = run.set_lr(optimizer, step)
            batch = rollout(model, tokenizer, task, step, cfg.batch_size, grpo, cfg.seed)
            stats = policy_update(model, reference, optimizer, batch, grpo, cfg, step)
            done = step + 1
            row = {
                "step": done,
                "reward": batch.rewards.mean().item(),
                "accuracy": batch.correct.mean().item(),
                "response_tokens": batch.lengths.mean().item(),
                "lr": lr,
                **{"kl": 0.0, "clip_fraction": 0.0, "trained_fraction": 0.0},
                **stats,
            }  # entropy: when trained
            if validation and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                model.eval()
                row["val_accuracy"] = accuracy_on(
                    model, tokenizer, task, "validation", validation, 0, grpo.max_response_tokens
                )["accuracy"]
                run.save_model(model, tokenizer, out / "steps" / f"{done:06d}")
            metrics.log(row)
            bar.set_postfix(
                {k: f"{v:.3f}" for k, v in row.items() if k in ("reward", "accuracy", "val_accuracy", "clip_fraction")}
            )
            run.end_of_step(done, model, optimizer, stop)
    rows = metrics.rows()[-10:]
    summary = {
        "final_reward": sum(r["reward"] for r in rows) / max(1, len(rows)),
        "final_accuracy": sum(r["accuracy"] for r in rows) / max(1, len(rows)),
    }
    model.eval()
    run.finish(model, tokenizer, summary)
    return summary
