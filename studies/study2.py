"""The compute study, round 2: DeepSeekMoE arms whose FLOPs are mostly in their routed experts (as in V3), a dense
model of equal FLOPs per token, budgets over 16x compute, and the multiplier (the FLOPs dense needs for an arm's
loss, over the arm's: Ling's "efficiency leverage", arXiv 2507.17702) as a function of compute, sparsity and
granularity.

    .venv/bin/python -m studies.study2                  # the full study on a CPU (hours; finished runs are reused)
    .venv/bin/python -m studies.study2 --quick          # a smoke test of every part
    bash studies/study2_gpu.sh                          # the plan for one H200: the same study at ~100x the compute

CPU scale (every arm): 4 layers, hidden 256, MLA with 4 heads (q rank 128, kv rank 64: attention about half of the
experts' active FLOPs, as in V3), a 1,024-token vocabulary trained once on the corpus (a small head), no MTP, no
group limit; experts of width w = 64:
- dense: a SwiGLU of width 9w in every layer;
- sparsity sweep: E experts of width w, top-8, one shared expert of width w (active width 9w, as dense's):
  E = 16, 32, 64, 128, 256, i.e. E/k = 2 ... 32 (V3 has 256 experts, top-8);
- granularity sweep at E/k = 8 and active width 9w: experts of width 1.5w (top-5 of 40, one shared), w (the E = 64
  arm) and w/2 (top-16 of 128, two shared): DeepSeekMoE's fine-grained segmentation of the same experts. (A coarser
  arm, 3w wide, would need its shared expert 3w wide too, putting its routed experts under half of the FLOPs.)
Budgets: 0.25 ... 16 x --steps steps (cosine), each a full schedule; three seeds at 1x, 4x and 16x (the top, where
the headline ratio is read: 2 epochs of the default Shakespeare corpus), one elsewhere; dense also at 32x, so that a
multiplier up to 2 at the top is read inside dense's measured curve. Each run is measured in held-out bits per byte.
Runs go seed by seed, each seed's budgets from the smallest, so an interrupted study (--stop-after, or a closed
laptop) has whole curves first; finished runs are reused. Each finished run is also a line of DOCS/runs.jsonl (its
result and configs): committed, it carries a study of many hours from one machine to the next.
The GPU scale doubles the width and the depth (hidden 512, 8 layers, 8 heads, w = 160, so that every arm's routed
experts keep over half of its FLOPs at 512 tokens of context) and runs 32 x 512 tokens a step in bf16: each budget is
~115x the CPU scale's compute. Its budgets are 0.25 ... 4x (4x is 11.5M tokens, 5.6 epochs), dense also at 8x.

The analysis (studies/study2_report.py) fits loss(C) = a·C^(−b) + c per arm with one floor c, and reads the
multiplier at each of an arm's budgets from the fits, with its spread over the three seed-wise fits and a jackknife
over budgets; the trend (slope of log multiplier against log compute); a law log m = α + β·log(E/k) + γ·log C over
the sparsity sweep, evaluated at V3's sparsity; and round 1's target-loss iso-loss ratios and GPU cost model. Writes
under --docs: sparsity_sweep.csv / .json / .png, iso_loss_ratio.png, multiplier_vs_compute.png and report.md, the
markdown report (studies/study2_markdown.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from nanoseek.config import DeepseekV3Config, ModelConfig
from nanoseek.data.tokenizer import load_tokenizer
from nanoseek.flops import model_stats
from nanoseek.train.config import TrainConfig
from nanoseek.train.data import run_dataset, run_sources
from studies.dense_vs_deepseek import Arm, run, study_tokenizer, train_config
from studies.study2_report import analyse_round2, write_round2

SEEDS = (1337, 2026, 7)
VOCAB = 1024
QUICK_STEPS = 4
QUICK_SEEDS = SEEDS[:2]  # two seeds where budgets repeat: the seed-wise errors still run
QUICK_HELD_OUT_WINDOWS = 64  # --quick measures 8K held-out tokens per run, not the whole split
SPARSITY = (16, 32, 64, 128, 256)  # experts of width w, top-8, one shared
GROUPS = {"sparsity": [f"moe-{e}" for e in SPARSITY], "granularity": ["moe-40-w1.5", "moe-64", "moe-128-w0.5"]}


@dataclass(frozen=True)
class Scale:
    """One size of the study: the arms' common shape, their expert width w, the batch, a 1x budget's steps, the
    budgets (multiples of those steps), where every seed runs, and dense's extra budget above the top."""

    shape: dict
    width: int
    batch_size: int
    seq_len: int
    steps: int
    precision: str
    budgets: tuple[float, ...]
    repeated: tuple[float, ...]
    dense_extra_budget: float

    def __post_init__(self) -> None:
        if not set(self.repeated) <= set(self.budgets) or max(self.budgets) not in self.repeated:
            raise ValueError(f"study2: repeated budgets {self.repeated} must be budgets and include the top")
        if self.dense_extra_budget <= max(self.budgets):
            raise ValueError("study2: dense's extra budget must lie above the top budget")


COMMON = dict(vocab_size=VOCAB, n_group=1, topk_group=1, routed_scaling_factor=2.5, num_nextn_predict_layers=0)
SCALES = {
    "cpu": Scale(
        dict(
            COMMON,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            q_lora_rank=128,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            max_position_embeddings=256,
        ),
        width=64,
        batch_size=16,
        seq_len=128,
        steps=125,
        precision="auto",
        budgets=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
        repeated=(1.0, 4.0, 16.0),
        dense_extra_budget=32.0,
    ),
    "gpu": Scale(
        dict(
            COMMON,
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            q_lora_rank=256,
            kv_lora_rank=128,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            max_position_embeddings=512,
        ),
        width=160,
        batch_size=32,
        seq_len=512,
        steps=175,
        precision="bf16",
        budgets=(0.25, 0.5, 1.0, 2.0, 4.0),
        repeated=(1.0, 4.0),
        dense_extra_budget=8.0,
    ),
}


def quick(scale: Scale) -> Scale:
    """--quick: the scale's budgets up to 4x, every seed at 1x and 4x (a smoke test of every part in minutes)."""
    budgets = tuple(b for b in scale.budgets if b <= 4.0)
    return dataclasses.replace(scale, budgets=budgets, repeated=(1.0, 4.0), dense_extra_budget=8.0)


def arms(scale: Scale) -> list[Arm]:
    w, layers = scale.width, scale.shape["num_hidden_layers"]

    def moe(experts: int, top_k: int, width: int, shared: int) -> ModelConfig:
        assert (top_k + shared) * width == 9 * w  # every arm's active expert width is dense's
        return DeepseekV3Config(
            **scale.shape,
            n_routed_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=width,
            n_shared_experts=shared,
            first_k_dense_replace=0,
        )

    return [
        Arm("dense", DeepseekV3Config(**scale.shape, intermediate_size=9 * w, first_k_dense_replace=layers)),
        *(Arm(f"moe-{e}", moe(e, 8, w, 1)) for e in SPARSITY),
        Arm("moe-40-w1.5", moe(40, 5, 3 * w // 2, 1)),
        Arm("moe-128-w0.5", moe(128, 16, w // 2, 2)),
    ]


def schedule(arm: Arm, scale: Scale, seeds: tuple[int, ...] = SEEDS) -> list[tuple[float, int]]:
    """(budget, seed) of every run of an arm."""
    budgets = scale.budgets + ((scale.dense_extra_budget,) if arm.name == "dense" else ())
    return [(b, seed) for b in budgets for seed in (seeds if b in scale.repeated else seeds[:1])]


def run_order(scale: Scale, seeds: tuple[int, ...]) -> list[tuple[Arm, float, int]]:
    """Every run of the study, seed by seed and each seed's budgets from the smallest: a study stopped part way has
    whole single-seed curves of every arm before it has any second seed."""
    runs = [(arm, budget, seed) for arm in arms(scale) for budget, seed in schedule(arm, scale, seeds)]
    return sorted(runs, key=lambda r: (seeds.index(r[2]), r[1]))


def config(scale: Scale, steps: int, seed: int, tokenizer: Path) -> TrainConfig:
    return dataclasses.replace(
        train_config(steps, seed, tokenizer, use_mtp=False),
        batch_size=scale.batch_size,
        seq_len=scale.seq_len,
        precision=scale.precision,
    )


def study_flops(scale: Scale, steps: int, seeds: tuple[int, ...] = SEEDS) -> float:
    """Training FLOPs of the whole study at this scale."""
    total = 0.0
    for arm in arms(scale):
        per_token = model_stats(arm.model, seq_len=scale.seq_len).flops_per_token
        total += (
            sum(round(steps * b) for b, _ in schedule(arm, scale, seeds)) * scale.batch_size * scale.seq_len * per_token
        )
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_STEPS} steps at 1x, two seeds, {QUICK_HELD_OUT_WINDOWS} held-out windows per run: a smoke test",
    )
    parser.add_argument("--steps", type=int, help="steps of a 1x budget (default: the scale's)")
    parser.add_argument(
        "--stop-after",
        type=float,
        metavar="MINUTES",
        help="start no run after this many minutes "
        "and leave the report alone unless every run has finished (rerun to go on)",
    )
    parser.add_argument("--out", help="run directories; finished runs are reused (default runs/study2-SCALE[-quick])")
    parser.add_argument("--docs", help="where the report goes (default docs/study2 for the CPU scale, else OUT/report)")
    args = parser.parse_args()
    scale = quick(SCALES[args.scale]) if args.quick else SCALES[args.scale]
    steps = args.steps or (QUICK_STEPS if args.quick else scale.steps)
    out = Path(args.out or f"runs/study2-{args.scale}{'-quick' if args.quick else ''}")
    docs = Path(args.docs or ("docs/study2" if args.scale == "cpu" and not args.quick else out / "report"))
    seeds = QUICK_SEEDS if args.quick else SEEDS
    flops = study_flops(scale, steps, seeds)
    print(
        f"{args.scale} scale: {flops:.3g} training FLOPs in all "
        f"({flops / study_flops(SCALES['cpu'], SCALES['cpu'].steps):.3g}x the full CPU study's)",
        flush=True,
    )
    tokenizer = study_tokenizer(out, VOCAB)
    windows = QUICK_HELD_OUT_WINDOWS if args.quick else None
    start = time.perf_counter()
    results = []
    order, ledger = run_order(scale, seeds), docs / "runs.jsonl"
    for arm, budget, seed in order:
        if args.stop_after is not None and time.perf_counter() - start > 60 * args.stop_after:
            print(
                f"study2: stopped after {args.stop_after:g} min, before run {len(results) + 1} of {len(order)} in "
                f"its order; rerun to go on (finished runs are reused: commit {ledger}, their record; "
                "the report needs every run)"
            )
            return
        results.append(run(out, arm, budget, config(scale, round(steps * budget), seed, tokenizer), windows, ledger))
    print(f"runs finished in {(time.perf_counter() - start) / 60:.1f} min (reused runs take none)")
    one_x = config(scale, steps, SEEDS[0], tokenizer)
    dataset = run_dataset(run_sources(None), load_tokenizer(tokenizer), one_x, progress=False)
    train_tokens = len(dataset.sources[0].train)
    configs = {
        arm.name: {"model": arm.model.to_hf_dict(), "train_1x": dataclasses.asdict(one_x)} for arm in arms(scale)
    }
    summary = analyse_round2(
        results, {arm.name: arm.model for arm in arms(scale)}, steps, scale.seq_len, GROUPS, train_tokens
    )
    write_round2(results, summary, configs, docs)
    print(summary["text"])


if __name__ == "__main__":
    main()
