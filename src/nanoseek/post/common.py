"""What SFT and RL share: a post-training run directory (from a model directory to a model directory), the chat
tokens added to the tokenizer (and the embedding grown to match), the optimizer and schedule, checkpoints for
--resume, and metrics."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from nanoseek.checkpoint.hf import load_pretrained, save_pretrained
from nanoseek.data.chat_format import add_chat_tokens, write_chat_tokenizer_files
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.errors import NanoseekError, RunInterrupted
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.registry import build_model
from nanoseek.parallel.collectives import save_final_model
from nanoseek.parallel.setup import Parallelism
from nanoseek.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from nanoseek.train.config import TrainConfig
from nanoseek.train.interrupt import StopRequests, resume_hint
from nanoseek.train.metrics import MetricsLog
from nanoseek.train.optim import build_optimizer, lr_factor


@dataclass(frozen=True)
class PostConfig:
    max_steps: int
    lr: float
    batch_size: int
    seed: int = 1337
    warmup_steps: int = 10
    eval_every: int = 50
    save_every: int = 100
    log_every: int = 5
    grad_accum: int = 1  # micro-batches per optimizer step (SFT): the batch's conversations split among them
    precision: str = "auto"  # the training forward's autocast: auto = bf16 on accelerators, fp32 on CPUs

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "eval_every", "save_every", "log_every", "grad_accum"):
            if getattr(self, name) < 1:
                raise NanoseekError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.warmup_steps < 0:
            raise NanoseekError("--lr must be positive and --warmup-steps >= 0")
        if self.grad_accum > self.batch_size:
            raise NanoseekError(
                f"--grad-accum {self.grad_accum} is more than the --batch-size {self.batch_size}: "
                "each micro-batch needs a conversation"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise NanoseekError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")

    def schedule(self) -> TrainConfig:
        """The pretraining trainer's AdamW settings and warmup + cosine schedule, without weight decay."""
        return TrainConfig(
            lr=self.lr,
            max_steps=self.max_steps,
            warmup_steps=min(self.warmup_steps, self.max_steps),
            weight_decay=0.0,
            min_lr_ratio=0.1,
            seed=self.seed,
            precision=self.precision,
        )


def resize_vocab(model: DeepseekV3Model, vocab_size: int) -> DeepseekV3Model:
    """A copy of the model with `vocab_size` rows of embedding and head; the new rows start at the mean of the old
    ones (so new tokens start as an average token rather than noise)."""
    old = model.config.vocab_size
    grown = build_model(model.config.replace(vocab_size=vocab_size)).to(next(model.parameters()).device)
    state = model.state_dict()
    for name in ("embed.weight", "head.weight"):
        rows = state[name]
        state[name] = torch.cat([rows, rows.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)])
    grown.load_state_dict(state)
    return grown


def device_for_run() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_dir(
    source: Path, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[DeepseekV3Model, Tokenizer]:
    """The model (fp32 to train: autocast runs the GEMMs in bf16) and its tokenizer with the chat tokens, the
    embedding grown if they are new."""
    if not (source / "tokenizer.json").is_file():
        raise NanoseekError(f"{source} has no tokenizer.json: give a run or model directory")
    model = load_pretrained(source, device=device, dtype=dtype)
    tokenizer = load_tokenizer(source / "tokenizer.json")
    add_chat_tokens(tokenizer)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        model = resize_vocab(model, tokenizer.get_vocab_size())
    return model, tokenizer


class PostRun:
    """The output directory of an SFT or RL run: refuses to overwrite a run unless resuming, keeps checkpoints,
    metrics.jsonl and the final model directory. Under torchrun every rank takes part in checkpoints and the final
    save (collectives); rank 0 alone writes the metrics and the files beside the model."""

    def __init__(
        self,
        out: Path,
        source: Path,
        kind: str,
        cfg: PostConfig,
        resume: bool,
        settings: dict[str, Any],
        par: Parallelism | None = None,
    ):
        self.out, self.source, self.kind, self.cfg = out, source, kind, cfg
        self.par = par or Parallelism(device=device_for_run())
        self.settings = {"kind": kind, "source": str(source.resolve()), **dataclasses.asdict(cfg), **settings}
        checkpoints = list_checkpoints(out / "checkpoints")
        if resume and not checkpoints:
            raise NanoseekError(f"nothing to resume: no checkpoint under {out / 'checkpoints'}")
        if not resume and (checkpoints or (out / "model.safetensors").exists()):
            raise NanoseekError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        self.resume_from = checkpoints[-1] if resume else None

    def start(self, model: DeepseekV3Model) -> tuple[torch.optim.Optimizer, int, MetricsLog | None]:
        """→ optimizer, first step, metrics log (rank 0's; None on the others), restored from the last checkpoint
        when resuming."""
        optimizer = build_optimizer(model, self.cfg.schedule(), next(model.parameters()).device)
        step = 0
        if self.resume_from is not None:
            meta = load_checkpoint(self.resume_from, model, optimizer, self.par.checkpoint_group)
            if meta.get("settings") != self.settings:
                raise NanoseekError(
                    f"--resume: {self.out} was started with other settings; it has {json.dumps(meta.get('settings'))}"
                )
            step = meta["step"]
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.par.is_main:
            return optimizer, step, None
        return optimizer, step, MetricsLog(self.out / "metrics.jsonl", step if self.resume_from else None)

    def set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.cfg.lr * lr_factor(step, self.cfg.schedule())
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_of_step(
        self, done: int, model: DeepseekV3Model, optimizer: torch.optim.Optimizer, stop: StopRequests
    ) -> None:
        """A checkpoint every save_every steps; when asked to stop (SIGTERM, Ctrl-C), a checkpoint now and
        RunInterrupted saying how to resume."""
        periodic = done % self.cfg.save_every == 0
        stopping = stop.agreed()  # collective under torchrun: a signal to one rank stops them all after this step
        if done >= self.cfg.max_steps or not (periodic or stopping):
            return
        path = save_checkpoint(
            self.out / "checkpoints",
            done,
            model,
            optimizer,
            {"settings": self.settings},
            keep=2,
            group=self.par.checkpoint_group,
        )
        if stopping:
            hint = resume_hint(done, str(path), f"nanoseek {self.kind} … --out {self.out} --resume")
            raise RunInterrupted(hint if self.par.is_main else "")

    @staticmethod
    def save_model(model: DeepseekV3Model, tokenizer: Tokenizer, path: Path) -> None:
        """A model directory that serve / eval / a next stage read."""
        save_pretrained(model, path)
        write_chat_tokenizer_files(tokenizer, path)

    def finish(self, model: DeepseekV3Model, tokenizer: Tokenizer, summary: dict[str, Any]) -> None:
        save_final_model(model, self.out, self.par)  # under torchrun: gathered from the shards, written by rank 0
        if self.par.is_main:
            write_chat_tokenizer_files(tokenizer, self.out)
            (self.out / f"{self.kind}.json").write_text(json.dumps({**self.settings, **summary}, indent=2) + "\n")
