"""The compute study: how many times the training FLOPs does a dense Llama-style model need to reach the loss of
DeepSeek-style models of equal FLOPs per token, and does the gain rise with sparsity and granularity?
(DeepSeek-V3 vs Llama 3.1 405B: 2.79M vs 30.84M GPU-hours.)

    .venv/bin/python -m studies.dense_vs_deepseek          # the full study: 87 min on 2 cores
    .venv/bin/python -m studies.dense_vs_deepseek --quick   # every arm at 60 steps per 1x: ~14 min, a smoke test

Arms, each at the same FLOPs per token (13.2–13.4M, ±1.2 %; MTP's extra FLOPs are counted), through one trainer,
corpus (the default Shakespeare), tokenizer (trained once) and schedule family (cosine, warmup 30 steps or a quarter
of a shorter run):
- dense: `tiny-dense`, GQA with SwiGLU in every layer;
- moe-E: the `tiny` shape (MLA, a dense first layer) with E routed experts of width w, top-k, and one shared expert of
  width w, k·w + w = 384 = the dense MLP's width: (8, 2, 128), (16, 2, 128), (32, 5, 64), (64, 5, 64). 8 → 16 adds
  experts; 16 → 32 splits them finer at the same total; 32 → 64 adds fine experts;
- moe-64+mtp: moe-64 trained with one MTP module (λ = 0.3), V3's full recipe.

Each arm trains at budgets of 0.25, 0.5, 1 and 2 times `--steps` steps, each a full schedule; every arm's 1x budget
(and dense's 2x, where the ratios are read) runs again with a second seed. Each finished run is measured in bits per
byte over its whole held-out split. loss(C) = a·C^(−b) + c is fitted to bits per byte against training FLOPs, a and
b per arm and one floor c for all (the data's entropy); the iso-loss ratio against dense is read from the fits at
the target loss every arm reaches (the highest of the arms' best fitted losses), with a jackknife over budgets for
its uncertainty.

Finished runs are reused (each holds a study.json with its configs: a run of other settings is not); an
unfinished one is started again. Writes under --docs:
sparsity_sweep.csv (one row per run), sparsity_sweep.json (every config, per-arm fits and iso-loss ratios, seed
spread, wall clock, the GPU cost model), sparsity_sweep.png (bits per byte against FLOPs, with the fits) and
iso_loss_ratio.png (ratio against total-to-active parameters).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from nanoseek.checkpoint.hf import load_pretrained
from nanoseek.config import ModelConfig
from nanoseek.data.prepare import tokenizer_digest
from nanoseek.data.sources import default_corpus_files, sample_texts
from nanoseek.data.tokenizer import load_tokenizer, token_byte_lengths, train_tokenizer
from nanoseek.flops import model_stats
from nanoseek.presets import preset
from nanoseek.train.config import TrainConfig
from nanoseek.train.data import run_dataset, run_sources
from nanoseek.train.heldout import held_out_loss
from nanoseek.train.trainer import RunSpec, train
from studies.study_report import analyse, write_report

BUDGETS = (0.25, 0.5, 1.0, 2.0)
SEEDS = (1337, 2026)
QUICK_STEPS, FULL_STEPS = 60, 500


@dataclass(frozen=True)
class Arm:
    name: str
    model: ModelConfig
    use_mtp: bool = False

    @property
    def repeated_budgets(self) -> tuple[float, ...]:
        """Where a second seed runs: every arm's 1x, and dense's 2x (the dense curve is read at its far end)."""
        return (1.0, 2.0) if self.name == "dense" else (1.0,)


def arms() -> list[Arm]:
    tiny = preset("tiny").replace(num_nextn_predict_layers=0)
    moe = {
        experts: tiny.replace(n_routed_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width)
        for experts, top_k, width in ((8, 2, 128), (16, 2, 128), (32, 5, 64), (64, 5, 64))
    }
    return [
        Arm("dense", preset("tiny-dense")),
        *(Arm(f"moe-{e}", m) for e, m in moe.items()),
        Arm("moe-64+mtp", moe[64].replace(num_nextn_predict_layers=1), use_mtp=True),
    ]


def train_config(steps: int, seed: int, tokenizer: Path, use_mtp: bool) -> TrainConfig:
    # warmup: the default 30 steps, or a quarter of a short run (with fewer steps the MoE arms' early loss spikes
    # could stall a run on the unigram plateau)
    return TrainConfig(
        max_steps=steps,
        warmup_steps=min(30, steps // 4),
        seed=seed,
        use_mtp=use_mtp,
        eval_every=steps,
        eval_batches=10,
        save_every=steps,
        keep_checkpoints=1,
        tokenizer=str(tokenizer),
    )


def study_tokenizer(out: Path, vocab_size: int = TrainConfig().vocab_size) -> Path:
    """One tokenizer for every run, trained once on the corpus: arms differ in the model alone."""
    path = out / "tokenizer.json"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        tokenizer = train_tokenizer(sample_texts(default_corpus_files(), 64 << 20, "text"), vocab_size)
        tokenizer.save(str(path) + ".tmp")
        Path(str(path) + ".tmp").rename(path)
    return path


def finished_runs(ledger: Path | None) -> list[dict]:
    """The results a ledger holds: one JSON object a line, appended as each run finishes."""
    if ledger is None or not ledger.is_file():
        return []
    results = []
    for number, line in enumerate(ledger.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise SystemExit(
                f"study: {ledger}:{number} is not a run's JSON ({error}); mend or delete that line"
            ) from None
    return results


def run_configs(arm: Arm, cfg: TrainConfig, held_out_windows: int | None = None) -> dict:
    """What a run is, as its JSON records it: two runs with equal configs are the same run."""
    # the tokenizer's digest as well as its path: a run is reused only where the same text made the same tokens
    return json.loads(
        json.dumps(
            {
                "model": arm.model.to_hf_dict(),
                "train": dataclasses.asdict(cfg),
                "tokenizer_digest": tokenizer_digest(load_tokenizer(Path(cfg.tokenizer))),
                **({"held_out_windows": held_out_windows} if held_out_windows else {}),
            }
        )
    )


def run(
    out: Path,
    arm: Arm,
    budget: float,
    cfg: TrainConfig,
    held_out_windows: int | None = None,
    ledger: Path | None = None,
) -> dict:
    """One run of `cfg` (its steps, seed and tokenizer): reused if it finished before (its study.json under `out`, or
    a line of `ledger`, a file that can be committed and so outlives the machine), else trained from the start and
    measured (over the whole held-out split, or its first `held_out_windows` windows), and appended to `ledger`."""
    run_dir = out / f"{arm.name}-{budget:g}x-seed{cfg.seed}"
    result_path = run_dir / "study.json"
    configs = run_configs(arm, cfg, held_out_windows)
    # reused only if it ran what this study would run
    recorded = [r for r in finished_runs(ledger) if r.get("configs") == configs]
    if recorded:
        return recorded[-1]
    if result_path.is_file() and (result := json.loads(result_path.read_text())).get("configs") == configs:
        if ledger is not None:
            _append(ledger, result)
        return result
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run starts again: its wall clock stays honest
    start = time.perf_counter()
    summary = train(RunSpec(run_dir, arm.model, cfg, None), show_progress=False)
    wall = time.perf_counter() - start
    model, loaded = load_pretrained(run_dir), load_tokenizer(Path(cfg.tokenizer))
    held_out = held_out_loss(
        model,
        run_dataset(run_sources(None), loaded, cfg, progress=False).sources[0].val,
        token_byte_lengths(loaded),
        cfg.seq_len,
        max_windows=held_out_windows,
    )
    stats = model_stats(arm.model, seq_len=cfg.seq_len)
    flops_per_token = stats.flops_per_token + (stats.mtp_flops_per_token if arm.use_mtp else 0.0)
    result = {
        "arm": arm.name,
        "budget": budget,
        "seed": cfg.seed,
        "steps": cfg.max_steps,
        "tokens": cfg.max_steps * cfg.tokens_per_step,
        "flops_per_token": flops_per_token,
        "train_flops": cfg.max_steps * cfg.tokens_per_step * flops_per_token,
        "wall_s": wall,
        "tokens_per_s": summary["final"]["tokens_per_s"],
        "sampled_val_loss": summary["val_loss"],
        "held_out_nats_per_token": held_out.nats_per_token,
        "held_out_tokens": held_out.tokens,
        "held_out_bytes": held_out.bytes,
        "bpb": held_out.bits_per_byte,
        "configs": configs,
    }
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    if ledger is not None:
        _append(ledger, result)
    print(
        f"{run_dir.name}: {cfg.max_steps} steps in {wall / 60:.1f} min, {held_out.bits_per_byte:.4f} bits/byte",
        flush=True,
    )
    return result


def _append(ledger: Path, result: dict) -> None:
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with ledger.open("a") as f:
        f.write(json.dumps(result) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps at 1x instead of {FULL_STEPS}")
    parser.add_argument("--steps", type=int, help="steps of a 1x budget (2,048 tokens each)")
    parser.add_argument("--out", help="run directories; finished runs are reused (default runs/study[-quick])")
    parser.add_argument("--docs", help="where the report goes (default docs/study, or OUT/report with --quick)")
    args = parser.parse_args()
    steps = args.steps or (QUICK_STEPS if args.quick else FULL_STEPS)
    out = Path(args.out or ("runs/study-quick" if args.quick else "runs/study"))
    docs = Path(args.docs or (out / "report" if args.quick else "docs/study"))
    tokenizer = study_tokenizer(out)
    study_start = time.perf_counter()
    results = [
        run(out, arm, budget, train_config(round(steps * budget), seed, tokenizer, arm.use_mtp))
        for arm in arms()
        for budget in BUDGETS
        for seed in (SEEDS if budget in arm.repeated_budgets else SEEDS[:1])
    ]
    print(f"runs finished in {(time.perf_counter() - study_start) / 60:.1f} min (reused runs take none)")
    configs = {
        arm.name: {
            "model": arm.model.to_hf_dict(),
            "train_1x": dataclasses.asdict(train_config(steps, SEEDS[0], tokenizer, arm.use_mtp)),
        }
        for arm in arms()
    }
    summary = analyse(results, {arm.name: (arm.model, arm.use_mtp) for arm in arms()}, steps, TrainConfig().seq_len)
    write_report(results, summary, configs, docs)
    print(summary["text"])


if __name__ == "__main__":
    main()
