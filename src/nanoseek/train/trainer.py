"""The training loop. A run directory holds everything a run makes and is itself a model directory:
config.json, tokenizer.json, model.safetensors (HF layout), checkpoints/, metrics.jsonl, loss.png."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from tqdm import tqdm

from nanoseek.config import ModelConfig
from nanoseek.data.dataset import TokenDataset
from nanoseek.data.tokenizer import check_vocab, end_of_text_id, load_tokenizer, write_tokenizer_files
from nanoseek.errors import ConfigError, NanoseekError, RunInterrupted, first_line
from nanoseek.flops import model_stats
from nanoseek.memory import check_training_fits
from nanoseek.model.transformer import Transformer
from nanoseek.parallel.collectives import clip_grad_norm, mean_over_ranks, save_final_model, sum_over_ranks
from nanoseek.parallel.pipeline import PipelineRunner
from nanoseek.parallel.setup import Parallelism, init_parallelism, parallelize
from nanoseek.train.balance import ImbalanceTracker, configure_balance, update_expert_bias
from nanoseek.train.checkpoint import (check_shapes, checkpoint_path, list_checkpoints, load_checkpoint, read_meta,
                                      save_checkpoint, saved_configs)
from nanoseek.train.config import TrainConfig, resume_train_config
from nanoseek.train.dsa import check_starting_shapes, configure_indexers, indexer_loss, load_initial_weights
from nanoseek.train.data import run_dataset, run_sources, run_tokenizer, same_sources
from nanoseek.train.interrupt import StopRequests, resume_hint
from nanoseek.train.metrics import (MetricsLog, PeakFlops, Stopwatch, Throughput, log_row, plot_losses,
                                   progress_text, synchronize)
from nanoseek.train.optim import build_optimizer, lr_factor
from nanoseek.train.precision import apply_precision, autocast


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


def _prepare(spec: RunSpec) -> tuple[RunSpec, Any, TokenDataset, Path | None]:
    """Resolves configs, tokenizer and data, all checked before anything in the run directory is written."""
    checkpoints = list_checkpoints(spec.out / "checkpoints")
    if spec.resume:
        if not checkpoints:
            raise NanoseekError(f"nothing to resume: no checkpoint under {spec.out / 'checkpoints'}")
        meta = read_meta(checkpoints[-1])
        saved_model, saved_train = saved_configs(meta, checkpoints[-1])
        check_shapes(checkpoints[-1], saved_model)
        saved_data = [meta["data"]] if isinstance(meta["data"], str) else meta["data"]  # older runs: one path
        if spec.data is not None and not same_sources(spec.data, saved_data):
            raise NanoseekError(f"--resume: the run trained on {' '.join(saved_data or ['the default corpus'])}, "
                                f"not {' '.join(spec.data)}; drop --data or start a new run")
        train_config = resume_train_config(saved_model, saved_train, spec.model, spec.train, spec.explicit)
        spec = dataclasses.replace(spec, model=saved_model, train=train_config, data=saved_data)
        tokenizer = load_tokenizer(spec.out / "tokenizer.json")
    else:
        if checkpoints or (spec.out / "model.safetensors").exists():
            raise NanoseekError(f"{spec.out} already holds a run; pass --resume to continue it or choose another "
                                "--out")
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
        raise NanoseekError(f"seq_len {spec.train.seq_len} exceeds the model's max_position_embeddings "
                            f"{spec.model.max_position_embeddings}")
    if spec.model.hyper_connections and spec.train.document_mask:
        raise NanoseekError("train.document_mask: DeepSeek-V4 takes no document mask (a compressed entry pools the "
                            "tokens of its window, whichever documents they belong to)")
    dataset = run_dataset(run_sources(spec.data), tokenizer, spec.train, progress=True)
    return spec, tokenizer, dataset, checkpoints[-1] if spec.resume else None


@torch.no_grad()
def evaluate(model: Transformer, dataset: TokenDataset, cfg: TrainConfig, par: Parallelism,
             pipeline: PipelineRunner | None) -> float:
    model.eval()
    total = torch.zeros((), device=par.device)
    for i in range(cfg.eval_batches):
        x, y, documents = _local_rows(_batch(dataset, "val", cfg, i), par)
        with autocast(par.device, cfg):
            total += (pipeline.eval_loss(x, y) if pipeline else
                      model(x.to(par.device), y.to(par.device), with_mtp=False,
                            documents=documents.to(par.device) if cfg.document_mask else None).lm_loss.float())
    model.train()
    return mean_over_ranks(total / cfg.eval_batches, par).item()


def _batch(dataset: TokenDataset, split: str, cfg: TrainConfig, step: int, micro: int = 0
           ) -> tuple[torch.Tensor, ...]:
    return dataset.batch(split, cfg.batch_size, cfg.seq_len, cfg.seed, step, micro,
                         at_document_starts=cfg.window_starts == "documents")


def _local_rows(batch: tuple[torch.Tensor, ...], par: Parallelism) -> tuple[torch.Tensor, ...]:
    """This data-parallel rank's share of the global batch: every run sees the same global batches."""
    rows = batch[0].shape[0] // par.dp
    return tuple(t[par.dp_rank * rows: (par.dp_rank + 1) * rows] for t in batch)


def _prepare_everywhere(spec: RunSpec, par: Parallelism) -> tuple[RunSpec, Any, TokenDataset, Path | None]:
    """Rank 0 resolves and checks everything, tokenizing the corpus if it is not prepared yet (and writes the run's
    config and tokenizer); the others receive the result, or its error, so that bad input stops every process at
    once, then open the shards rank 0 wrote. They wait over a gloo group of their own whose timeout allows a long
    tokenization: the default group's is short, to notice a dead peer during training."""
    payload: list[Any] = [None]
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=24)) if par.distributed else None
    if par.is_main:
        try:
            spec, tokenizer, dataset, resume_from = _prepare(spec)
            spec.out.mkdir(parents=True, exist_ok=True)
            if resume_from is None:
                write_tokenizer_files(tokenizer, spec.out)
                spec.model.save_json(spec.out / "config.json")
            payload = [(spec, tokenizer.to_str(), resume_from)]
        except NanoseekError as e:
            payload = [e]
    if par.distributed:
        dist.broadcast_object_list(payload, src=0, group=group)
    if isinstance(payload[0], NanoseekError):
        raise payload[0]
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
        raise ConfigError("with --pp the pipeline's micro-batches replace gradient accumulation: set "
                          "train.grad_accum=1")
    if spec.train.document_mask:
        raise ConfigError("train.document_mask is not supported with --pp (its stages run causal attention)")
    if spec.model.sparse_attention:
        raise ConfigError("V3.2's indexer loss is not carried through pipeline stages: train it without --pp")
    if spec.model.hyper_connections:
        raise ConfigError("V4 is not pipelined: its residual streams and the token ids its hash-routed layers need "
                          "do not cross stages; train it without --pp")


def train(spec: RunSpec, show_progress: bool = True) -> dict[str, Any]:
    _check_pipeline(spec)
    par = init_parallelism(spec.dp, spec.ep, spec.pp, spec.pp_schedule)
    try:
        return _train(spec, par, show_progress and par.is_main)
    except (RuntimeError, dist.DistError) as e:
        if not par.distributed:
            raise
        # gloo/NCCL report a dead or stalled peer from inside whatever collective was running
        first = first_line(e)
        raise NanoseekError(f"rank {par.rank}: a collective with the other processes failed (did one die?): "
                            f"{first}") from None
    finally:
        if par.distributed:
            dist.destroy_process_group()


def build_model(spec: RunSpec, par: Parallelism) -> tuple[Transformer, PipelineRunner | None]:
    """torchtitan's order: build on the meta device, apply precision, parallelize, then materialize and initialize
    (sharding-independent seeded values, so every layout starts from the one-process weights). A model too large
    for one device is never whole on any."""
    cfg = spec.train
    with torch.device("meta"):
        model = Transformer(spec.model)
    # fp32 weights and gradients, AdamW's two moments (fp32 or bf16)
    check_training_fits(sum(p.numel() for p in model.parameters()), 12 if cfg.optimizer_moments == "bf16" else 16,
                        par.world, par.device)
    configure_balance(model.moe_layers(), cfg)
    apply_precision(model, cfg)
    pipeline = None
    if par.pp > 1:
        _check_pipeline(spec)  # again: on --resume, the model is the checkpoint's
        pipeline = PipelineRunner(model, par, cfg.batch_size // par.dp, cfg.mtp_weight)
    parallelize(model, par)
    model.to_empty(device=par.device)
    model.reset_parameters(seed=cfg.seed)
    return model, pipeline


def _train(spec: RunSpec, par: Parallelism, show_progress: bool) -> dict[str, Any]:
    with StopRequests(announce=par.is_main) as stop:
        return _train_until_stopped(spec, par, show_progress, stop)


def _train_until_stopped(spec: RunSpec, par: Parallelism, show_progress: bool, stop: StopRequests) -> dict[str, Any]:
    spec, tokenizer, dataset, resume_from = _prepare_everywhere(spec, par)
    cfg, out, device = spec.train, spec.out, par.device
    if cfg.batch_size % par.dp:
        raise NanoseekError(f"batch_size {cfg.batch_size} does not split over {par.dp} data-parallel ranks")
    par = dataclasses.replace(par, compute_dtype=cfg.compute_dtype(device))
    torch.manual_seed(cfg.seed)
    model, pipeline = build_model(spec, par)
    if spec.init_from is not None and resume_from is None:
        load_initial_weights(model, spec.init_from)
    indexers = configure_indexers(model, cfg.dsa)
    warmup = bool(indexers) and cfg.dsa == "warmup"
    optimizer = build_optimizer(model, cfg, device)
    start = load_checkpoint(resume_from, model, optimizer)["step"] if resume_from else 0
    metrics = MetricsLog(out / "metrics.jsonl", start if resume_from else None) if par.is_main else None
    meta = {"model": spec.model.to_hf_dict(), "train": dataclasses.asdict(cfg), "data": spec.data}
    moe_layers = model.moe_layers()
    tracker = ImbalanceTracker(len(moe_layers))
    stats = model_stats(spec.model, seq_len=cfg.seq_len)
    flops_per_token = stats.flops_per_token + stats.mtp_flops_per_token
    peak, throughput = PeakFlops(device, par.compute_dtype, par.world), Throughput(window=50)
    accumulate_sync = par.dp > 1 and pipeline is None  # FSDP: reduce gradients on the last micro-batch only
    val_loss = None
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="training",
               disable=not show_progress, dynamic_ncols=True)
    # Nothing in a step reads a device value back to the host: losses, norms and expert loads stay on the device
    # and are read once per logged step (the tokens/s of a log row covers the steps since the previous one).
    interval_start, interval_steps, paused = time.perf_counter(), 0, Stopwatch(device)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        for m in moe_layers:
            m.expert_load.zero_()
        sums = torch.zeros(4, device=device)  # LM, MTP, balance and indexer losses, summed over micro-batches
        if pipeline:
            sums[:2] = pipeline.train_step(*_local_rows(_batch(dataset, "train", cfg, step), par)[:2])
        for micro in range(cfg.grad_accum if pipeline is None else 0):
            if accumulate_sync:
                model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)
            x, y, documents = _local_rows(_batch(dataset, "train", cfg, step, micro), par)
            with autocast(device, cfg):
                result = model(x.to(device), y.to(device),
                               documents=documents.to(device) if cfg.document_mask else None)
            loss = result.lm_loss
            sums[0] += result.lm_loss.detach()
            if result.mtp_loss is not None:
                loss = loss + cfg.mtp_weight * result.mtp_loss
                sums[1] += result.mtp_loss.detach()
            aux = [m.aux_loss for m in moe_layers if m.seq_aux_alpha > 0 and m.aux_loss is not None]
            if aux:
                aux_total = torch.stack(aux).sum()
                loss = loss + aux_total
                sums[2] += aux_total.detach()
            kl = indexer_loss(indexers)
            if kl is not None:
                loss = kl if warmup else loss + kl  # the warm-up's only loss: the rest of the model is frozen
                sums[3] += kl.detach()
            (loss / cfg.grad_accum).backward()
        loads = sum_over_ranks([m.expert_load.clone() for m in moe_layers], par)
        grad_norm = clip_grad_norm(list(model.parameters()), cfg.grad_clip, par)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.balance == "aux-free" and not warmup:
            update_expert_bias(moe_layers, loads, cfg.bias_update_speed)
        if loads:
            tracker.add(loads)
        done, interval_steps = step + 1, interval_steps + 1
        evaluating = done % cfg.eval_every == 0 or done == cfg.max_steps
        if evaluating:
            with paused:
                val_loss = evaluate(model, dataset, cfg, par, pipeline)
        if done % cfg.log_every == 0 or evaluating:
            row = log_row(done, mean_over_ranks(sums, par), grad_norm, optimizer, cfg.grad_accum,
                          bool(spec.model.num_nextn_predict_layers), bool(indexers))
            synchronize(device)
            throughput.add(interval_steps, time.perf_counter() - interval_start - paused.seconds)
            tokens_per_s = throughput.tokens_per_s(cfg.tokens_per_step)
            with paused:  # a re-measured peak is not training time
                mfu = peak.mfu(tokens_per_s * flops_per_token)
            row.update(tokens_per_s=tokens_per_s, tokens_per_s_steps=throughput.steps, mfu=mfu,
                       mfu_peak=peak.source)
            if par.ep > 1:
                # all-to-all traffic of this rank since the last row: forward dispatch + combine, same in backward
                row["a2a_bytes"] = 2 * sum(m.experts.sent_bytes for m in moe_layers) // interval_steps
                for m in moe_layers:
                    m.experts.sent_bytes = 0
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
                save_checkpoint(out / "checkpoints", done, model, optimizer, meta, cfg.keep_checkpoints)
        if stop.agreed() and done < cfg.max_steps:
            bar.close()
            if not saved:
                save_checkpoint(out / "checkpoints", done, model, optimizer, meta, cfg.keep_checkpoints)
            raise RunInterrupted(resume_hint(done, str(checkpoint_path(out / "checkpoints", done)),
                                             f"nanoseek train --out {out} --resume") if par.is_main else "")
    bar.close()
    save_final_model(model, out, par)
    rows = metrics.rows() if metrics else []
    if metrics:
        plot_losses(rows, out / "loss.png")
    return {"run_dir": str(out), "steps": cfg.max_steps, "val_loss": val_loss,
            "unigram_entropy": dataset.unigram_entropy(),
            "imbalance_last_100": tracker.window() if moe_layers else None, "final": rows[-1] if rows else None}
