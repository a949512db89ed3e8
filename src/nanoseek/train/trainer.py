"""The training loop. A run directory holds everything a run makes and is itself a model directory:
config.json, tokenizer.json, model.safetensors (HF layout), checkpoints/, metrics.jsonl, loss.png."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from tqdm import tqdm

from nanoseek.config import ModelConfig
from nanoseek.data.dataset import TokenDataset
from nanoseek.data.tokenizer import check_vocab, end_of_text_id, load_tokenizer, write_tokenizer_files
from nanoseek.errors import ConfigError, NanoseekError, RunInterrupted
from nanoseek.flops import model_stats
from nanoseek.memory import check_training_fits
from nanoseek.models.deepseek_v3.model import DeepseekV3Model
from nanoseek.models.registry import architecture, build_model
from nanoseek.parallel.collectives import mean_over_ranks, save_final_model
from nanoseek.parallel.expert_parallel import take_sent_bytes
from nanoseek.parallel.setup import Parallelism, explain_failure, init_parallelism, parallelize
from nanoseek.train.balance import ImbalanceTracker, balance_alpha
from nanoseek.train.checkpoint import (
    check_shapes,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    saved_configs,
)
from nanoseek.train.config import TrainConfig, resume_train_config
from nanoseek.train.data import run_dataset, run_sources, run_tokenizer, same_sources
from nanoseek.train.dsa import check_starting_shapes, configure_indexers, load_initial_weights
from nanoseek.train.interrupt import StopRequests, resume_hint
from nanoseek.train.loader import BatchLoader, local_batch
from nanoseek.train.metrics import (
    MetricsLog,
    PeakFlops,
    Stopwatch,
    Throughput,
    log_row,
    plot_losses,
    progress_text,
    synchronize,
)
from nanoseek.train.optim import build_optimizer
from nanoseek.train.precision import apply_precision, autocast, use_tf32
from nanoseek.train.step import TrainStep

if TYPE_CHECKING:  # imported where a pipeline is built: torch's pipelining imports dynamo (~0.8 s)
    from nanoseek.parallel.pipeline import PipelineRunner


@dataclass(frozen=True)
class RunSpec:
    out: Path
    model: ModelConfig
    train: TrainConfig
    data: list[str] | None  # --data: sources as PATH[:WEIGHT] or a YAML list; None = the embedded default
    resume: bool = False
    dp: int | None = None  # data-parallel ranks (default: every process torchrun started)
    ep: int = 1  # expert-parallel ranks within them
    pp: int = 1  # pipeline ranks
    pp_schedule: str = "1f1b"
    explicit: frozenset[str] = frozenset()  # settings the user gave (model.X / train.X): on resume, checked or applied
    init_from: Path | None = None  # --from: a model directory whose weights start the run (e.g. V3 → V3.2)

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):  # one source, as a path
            object.__setattr__(self, "data", [str(self.data)])


def _prepare(spec: RunSpec, stop: StopRequests) -> tuple[RunSpec, Any, TokenDataset, Path | None]:
    """Resolves configs, tokenizer and data, all checked before anything in the run directory is written; a stop
    asked while the corpus is tokenized ends the tokenization (RunInterrupted)."""
    checkpoints = list_checkpoints(spec.out / "checkpoints")
    if spec.resume:
        if not checkpoints:
            raise NanoseekError(f"nothing to resume: no checkpoint under {spec.out / 'checkpoints'}")
        meta = read_meta(checkpoints[-1])
        saved_model, saved_train = saved_configs(meta, checkpoints[-1])
        check_shapes(checkpoints[-1], saved_model)
        saved_data = [meta["data"]] if isinstance(meta["data"], str) else meta["data"]  # older runs: one path
        if spec.data is not None and not same_sources(spec.data, saved_data):
            raise NanoseekError(
                f"--resume: the run trained on {' '.join(saved_data or ['the default corpus'])}, "
                f"not {' '.join(spec.data)}; drop --data or start a new run"
            )
        train_config = resume_train_config(saved_model, saved_train, spec.model, spec.train, spec.explicit)
        spec = dataclasses.replace(spec, model=saved_model, train=train_config, data=saved_data)
        tokenizer = load_tokenizer(spec.out / "tokenizer.json")
    else:
        if checkpoints or (spec.out / "model.safetensors").exists():
            raise NanoseekError(f"{spec.out} already holds a run; pass --resume to continue it or choose another --out")
        if spec.init_from is not None:
            check_starting_shapes(spec.model, spec.init_from)
        tokenizer, trained = run_tokenizer(run_sources(spec.data), spec.train)
        if trained:
            spec = dataclasses.replace(spec, model=spec.model.replace(vocab_size=spec.train.vocab_size))
        else:
            check_vocab(tokenizer, spec.model.vocab_size)
        eot = end_of_text_id(tokenizer)
        spec = dataclasses.replace(spec, model=spec.model.replace(bos_token_id=eot, eos_token_id=eot))
    if not spec.train.use_mtp:
        spec = dataclasses.replace(spec, model=spec.model.replace(num_nextn_predict_layers=0))
    if spec.train.seq_len > spec.model.max_position_embeddings:
        raise NanoseekError(
            f"seq_len {spec.train.seq_len} exceeds the model's max_position_embeddings "
            f"{spec.model.max_position_embeddings}"
        )
    if spec.train.document_mask and not architecture(spec.model).model.takes_document_mask:
        raise NanoseekError(
            "train.document_mask: DeepSeek-V4 takes no document mask (a compressed entry pools the "
            "tokens of its window, whichever documents they belong to)"
        )
    dataset = run_dataset(run_sources(spec.data), tokenizer, spec.train, progress=True, stop=lambda: stop.requested)
    return spec, tokenizer, dataset, checkpoints[-1] if spec.resume else None


@torch.no_grad()
def evaluate(
    model: DeepseekV3Model, dataset: TokenDataset, cfg: TrainConfig, par: Parallelism, pipeline: PipelineRunner | None
) -> float:
    model.eval()
    total = torch.zeros((), device=par.device)
    for i in range(cfg.eval_batches):
        x, y, documents = local_batch(dataset, "val", cfg, par, i)
        with autocast(par.device, cfg):
            total += (
                pipeline.eval_loss(x, y)
                if pipeline
                else model(
                    x.to(par.device),
                    y.to(par.device),
                    with_mtp=False,
                    documents=documents.to(par.device) if cfg.document_mask else None,
                ).lm_loss.float()
            )
    model.train()
    return mean_over_ranks(total / cfg.eval_batches, par).item()


def _prepare_everywhere(
    spec: RunSpec, par: Parallelism, stop: StopRequests
) -> tuple[RunSpec, Any, TokenDataset, Path | None]:
    """Rank 0 resolves and checks everything, tokenizing the corpus if it is not prepared yet (and writes the run's
    config and tokenizer); the others receive the result, or its error, so that bad input stops every process at
    once, then open the shards rank 0 wrote. They wait over a gloo group of their own whose timeout allows a long
    tokenization: the default group's is short, to notice a dead peer during training."""
    payload: list[Any] = [None]
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=24)) if par.distributed else None
    if par.is_main:
        try:
            spec, tokenizer, dataset, resume_from = _prepare(spec, stop)
            spec.out.mkdir(parents=True, exist_ok=True)
            if resume_from is None:
                write_tokenizer_files(tokenizer, spec.out)
                spec.model.save_json(spec.out / "config.json")
            payload = [(spec, tokenizer.to_str(), resume_from)]
        except (NanoseekError, RunInterrupted) as e:
            payload = [e]
    if par.distributed:
        dist.broadcast_object_list(payload, src=0, group=group)
    if isinstance(payload[0], (NanoseekError, RunInterrupted)):
        raise payload[0] if par.is_main or isinstance(payload[0], NanoseekError) else RunInterrupted("")
    if par.is_main:
        return spec, tokenizer, dataset, resume_from
    spec, tokenizer_json, resume_from = payload[0]
    tokenizer = Tokenizer.from_str(tokenizer_json)
    return spec, tokenizer, run_dataset(run_sources(spec.data), tokenizer, spec.train, progress=False), resume_from


def _check_pipeline(spec: RunSpec) -> None:
    """What a pipeline cannot train, refused before any process group is set up (and once the run's model is
    known)."""
    if spec.pp == 1:
        return
    if spec.train.grad_accum != 1:
        raise ConfigError(
            "with --pp the pipeline's micro-batches replace gradient accumulation: set train.grad_accum=1"
        )
    if spec.train.document_mask:
        raise ConfigError("train.document_mask is not supported with --pp (its stages run causal attention)")
    refusal = architecture(spec.model).model.pipeline_refusal
    if refusal:
        raise ConfigError(refusal)


def train(spec: RunSpec, show_progress: bool = True) -> dict[str, Any]:
    _check_pipeline(spec)
    par = init_parallelism(
        spec.dp, spec.ep, spec.pp, spec.pp_schedule, spec.train.collective_timeout_s, spec.train.checkpoint_timeout_s
    )
    try:
        return _train(spec, par, show_progress and par.is_main)
    except (RuntimeError, MemoryError, dist.DistError) as e:
        explained = explain_failure(e, par, spec.train.collective_timeout_s)
        if explained is None:
            raise
        raise explained from None
    finally:
        if par.distributed:
            dist.destroy_process_group()


def build_parallel_model(spec: RunSpec, par: Parallelism) -> tuple[DeepseekV3Model, PipelineRunner | None]:
    """torchtitan's order: build on the meta device, apply precision, parallelize, then materialize and initialize
    (sharding-independent seeded values, so every layout starts from the one-process weights). A model too large
    for one device is never whole on any."""
    cfg = spec.train
    with torch.device("meta"):
        model = build_model(spec.model)
    # fp32 weights and gradients, AdamW's two moments (fp32 or bf16)
    check_training_fits(
        sum(p.numel() for p in model.parameters()), 12 if cfg.optimizer_moments == "bf16" else 16, par.world, par.device
    )
    apply_precision(model, cfg)
    pipeline = None
    if par.pp > 1:
        _check_pipeline(spec)  # again: on --resume, the model is the checkpoint's
        from nanoseek.parallel.pipeline import PipelineRunner

        pipeline = PipelineRunner(model, par, cfg.batch_size // par.dp, cfg.mtp_weight, balance_alpha(cfg))
    parallelize(model, par)
    model.to_empty(device=par.device)
    model.reset_parameters(seed=cfg.seed)
    return model, pipeline


def _train(spec: RunSpec, par: Parallelism, show_progress: bool) -> dict[str, Any]:
    with StopRequests(announce=par.is_main) as stop:
        return _train_until_stopped(spec, par, show_progress, stop)


def _train_until_stopped(spec: RunSpec, par: Parallelism, show_progress: bool, stop: StopRequests) -> dict[str, Any]:
    spec, tokenizer, dataset, resume_from = _prepare_everywhere(spec, par, stop)
    cfg, out, device = spec.train, spec.out, par.device
    if cfg.batch_size % par.dp:
        raise NanoseekError(f"batch_size {cfg.batch_size} does not split over {par.dp} data-parallel ranks")
    par = dataclasses.replace(par, compute_dtype=cfg.compute_dtype(device))
    torch.manual_seed(cfg.seed)
    use_tf32(cfg.tf32)
    model, pipeline = build_parallel_model(spec, par)
    if spec.init_from is not None and resume_from is None:
        load_initial_weights(model, spec.init_from)
    indexers = configure_indexers(model, cfg.dsa)
    warmup = bool(indexers) and cfg.dsa == "warmup"
    optimizer = build_optimizer(model, cfg, device)
    start = load_checkpoint(resume_from, model, optimizer, par.checkpoint_group)["step"] if resume_from else 0
    metrics = MetricsLog(out / "metrics.jsonl", start if resume_from else None) if par.is_main else None
    meta = {"model": spec.model.to_hf_dict(), "train": dataclasses.asdict(cfg), "data": spec.data}
    moe_layers = model.moe_layers()
    tracker = ImbalanceTracker(len(moe_layers))
    stats = model_stats(spec.model, seq_len=cfg.seq_len)
    flops_per_token = stats.flops_per_token + stats.mtp_flops_per_token
    peak, throughput = PeakFlops(device, par.compute_dtype, par.world), Throughput(window=50)
    val_loss = None
    bar = tqdm(
        range(start, cfg.max_steps),
        initial=start,
        total=cfg.max_steps,
        desc="training",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    # Nothing in a step reads a device value back to the host (train/step.py): its losses, norm and expert loads
    # are read once per logged step (the tokens/s of a log row covers the steps since the previous one).
    interval_start, interval_steps, paused = time.perf_counter(), 0, Stopwatch(device)
    loader = BatchLoader(dataset, cfg, par, start, cfg.grad_accum if pipeline is None else 1)
    train_step = TrainStep(model, optimizer, cfg, par, loader, pipeline, warmup)
    for step in bar:
        result = train_step(step)
        sums, grad_norm, loads = result.sums, result.grad_norm, result.loads
        if loads:
            tracker.add(loads)
        done, interval_steps = step + 1, interval_steps + 1
        evaluating = done % cfg.eval_every == 0 or done == cfg.max_steps
        if evaluating:
            with paused:
                val_loss = evaluate(model, dataset, cfg, par, pipeline)
        if done % cfg.log_every == 0 or evaluating:
            row = log_row(
                done,
                mean_over_ranks(sums, par),
                grad_norm,
                optimizer,
                cfg.grad_accum,
                bool(spec.model.num_nextn_predict_layers),
                bool(indexers),
            )
            synchronize(device)
            throughput.add(interval_steps, time.perf_counter() - interval_start - paused.seconds)
            tokens_per_s = throughput.tokens_per_s(cfg.tokens_per_step)
            with paused:  # a re-measured peak is not training time
                mfu = peak.mfu(tokens_per_s * flops_per_token)
            row.update(tokens_per_s=tokens_per_s, tokens_per_s_steps=throughput.steps, mfu=mfu, mfu_peak=peak.source)
            if par.ep > 1:
                # all-to-all traffic of this rank since the last row: forward dispatch + combine, same in backward
                row["a2a_bytes"] = 2 * take_sent_bytes(model) // interval_steps
            if loads:
                row.update(imbalance=tracker.last(), imbalance_window=tracker.window())
            if evaluating:
                row.update(val_loss=val_loss, val_ppl=math.exp(val_loss))
            if metrics:
                metrics.log(row)
            bar.set_postfix_str(progress_text(row, val_loss, peak.source))
            interval_start, interval_steps, paused.seconds = time.perf_counter(), 0, 0.0
        saved = done % cfg.save_every == 0 or done == cfg.max_steps
        if saved:
            with paused:
                save_checkpoint(
                    out / "checkpoints", done, model, optimizer, meta, cfg.keep_checkpoints, par.checkpoint_group
                )
        if stop.agreed() and done < cfg.max_steps:
            bar.close()
            loader.close()
            if not saved:
                save_checkpoint(
                    out / "checkpoints", done, model, optimizer, meta, cfg.keep_checkpoints, par.checkpoint_group
                )
            raise RunInterrupted(
                resume_hint(
                    done, str(checkpoint_path(out / "checkpoints", done)), f"nanoseek train --out {out} --resume"
                )
                if par.is_main
                else ""
            )
    bar.close()
    loader.close()
    save_final_model(model, out, par)
    rows = metrics.rows() if metrics else []
    if metrics:
        plot_losses(rows, out / "loss.png")
    return {
        "run_dir": str(out),
        "steps": cfg.max_steps,
        "val_loss": val_loss,
        "unigram_entropy": dataset.unigram_entropy(),
        "imbalance_last_100": tracker.window() if moe_layers else None,
        "final": rows[-1] if rows else None,
    }
