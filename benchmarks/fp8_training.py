"""FP8 training against full precision: the V3 report's "relative loss error below 0.25 %", on nanoseek's default run.

    .venv/bin/python benchmarks/fp8_training.py [--steps 600] [--seeds 1337 1 2] [--out runs/fp8-study]
    .venv/bin/python benchmarks/fp8_training.py --step-time [--preset 1b] [--batch 8] [--seq 512]

The first form trains the tiny preset on the default corpus twice per seed (same initialization and data order): once
in the default precision (fp32 on a CPU, bf16 on a GPU) and once with `--precision fp8`, then prints the validation
losses, their relative differences and their mean, and the full-precision runs' seed-to-seed spread (the noise floor).
The second times training steps of both precisions on random tokens: on a GPU that is the FP8
vs bf16 step time; on a CPU it is the cost of emulating FP8 exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.flops import model_stats
from nanoseek.models.registry import build_model
from nanoseek.presets import preset
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import build_optimizer
from nanoseek.train.precision import apply_precision, autocast
from nanoseek.train.trainer import RunSpec, train


def final_val_loss(run: Path, steps: int, precision: str, seed: int) -> float:
    """Trains the run (or reuses it when finished) and returns its last validation loss."""
    if not (run / "model.safetensors").exists():
        start = time.perf_counter()
        train(
            RunSpec(run, preset("tiny"), TrainConfig(max_steps=steps, precision=precision, seed=seed), None),
            show_progress=False,
        )
        print(f"{run.name}: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def compare_runs(out: Path, steps: int, seeds: list[int]) -> None:
    """Per seed (which fixes initialization and data order for both), the FP8 run's relative difference; the seed-to-
    seed spread of the full-precision runs is the noise floor such a difference is measured against."""
    full, fp8 = [], []
    for seed in seeds:
        full.append(final_val_loss(out / f"full-seed{seed}", steps, "auto", seed))
        fp8.append(final_val_loss(out / f"fp8-seed{seed}", steps, "fp8", seed))
        print(
            f"seed {seed}: full precision {full[-1]:.4f}, fp8 {fp8[-1]:.4f}, "
            f"relative difference {100 * (fp8[-1] - full[-1]) / full[-1]:+.3f} %",
            flush=True,
        )
    differences = [(b - a) / a for a, b in zip(full, fp8)]
    mean_difference = statistics.mean(differences)
    summary = {
        "steps": steps,
        "seeds": seeds,
        "full_val_loss": full,
        "fp8_val_loss": fp8,
        "relative_differences": differences,
        "mean_relative_difference": mean_difference,
    }
    print(f"mean over {len(seeds)} seeds: {100 * mean_difference:+.3f} %  (V3 report: within 0.25 %)")
    if len(seeds) > 1:
        spread = statistics.stdev(full) / statistics.mean(full)
        summary["full_precision_seed_spread"] = spread
        print(f"seed-to-seed spread (std / mean) of the full-precision runs: {100 * spread:.3f} %")
    (out / "fp8_vs_full.json").write_text(json.dumps(summary, indent=2) + "\n")


def step_seconds(
    config: ModelConfig, cfg: TrainConfig, device: torch.device, batch: int, seq: int, steps: int = 10
) -> float:
    torch.manual_seed(0)
    model = build_model(config).to(device)
    apply_precision(model, cfg)
    optimizer = build_optimizer(model, cfg, device)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        with autocast(device, cfg):
            out = model(ids, ids)
        (out.lm_loss + 0.3 * out.mtp_loss if out.mtp_loss is not None else out.lm_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first steps warm up kernels and allocators
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_step_times(shape: str, batch: int, seq: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = preset(shape)
    stats = model_stats(config, seq_len=seq)
    print(f"{shape}: {stats.total_params / 1e9:.2f}B parameters, {stats.active_params / 1e9:.2f}B active")
    base = TrainConfig(seq_len=seq, batch_size=batch)
    times = {
        p: step_seconds(config, dataclasses.replace(base, precision=p), device, batch, seq) for p in ("auto", "fp8")
    }
    full = "bf16" if device.type == "cuda" else "fp32"
    print(
        f"{shape} on {device.type}, batch {batch} x seq {seq}: {full} {times['auto'] * 1e3:.0f} ms/step, "
        f"fp8 {times['fp8'] * 1e3:.0f} ms/step, fp8 / {full} = {times['fp8'] / times['auto']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[1337, 1, 2],
        help="one pair of runs per seed (finished runs under --out are reused)",
    )
    parser.add_argument("--out", default="runs/fp8-study")
    parser.add_argument("--step-time", action="store_true", help="time training steps instead of comparing runs")
    parser.add_argument("--preset", default="1b", help="1b (the GPU comparison) or a nanoseek preset")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    if args.step_time:
        compare_step_times(args.preset, args.batch, args.seq)
    else:
        compare_runs(Path(args.out), args.steps, args.seeds)


if __name__ == "__main__":
    main()
