"""The compute study: how many training FLOPs does a dense Llama-style model need to reach the loss of nanoseek's MLA +
DeepSeekMoE model? (DeepSeek-V3 vs Llama 3.1 405B: 2.79M vs 30.84M GPU-hours.)

    .venv/bin/python benchmarks/dense_vs_deepseek.py [--out runs/study] [--steps 600] [--docs docs/study]

Both arms use the same corpus (the default Shakespeare), tokenizer, optimizer, schedule, batch and trainer; neither
uses MTP. The DeepSeek arm is the `tiny` preset (MLA, 8 routed experts top-2 + 1 shared, aux-loss-free balancing);
the dense arm is `tiny-dense` (GQA with 2 KV heads, SwiGLU in every layer), sized to the same training FLOPs per
token (2.12M active parameters each). Each arm trains at several FLOP budgets, each run with its own full cosine
schedule, so that every final loss is the best that budget buys. The iso-loss FLOP ratio is read off the dense arm's
final-loss curve (log-linear interpolation) at the DeepSeek arm's loss at 1x budget.

Writes CSV (every evaluation of every run), a PNG and a JSON summary (configs included) under --docs, and prints the
ratio. About 40 minutes on a 2-core CPU at the default size.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.flops import model_stats  # noqa: E402
from nanoseek.train.config import TrainConfig  # noqa: E402
from nanoseek.train.trainer import RunSpec, train  # noqa: E402

ARMS = {"deepseek": ("tiny", (0.5, 1.0)), "dense": ("tiny-dense", (0.5, 1.0, 2.0, 3.0))}


def run_arm(out: Path, arm: str, budget: float, steps: int) -> list[dict]:
    preset, _ = ARMS[arm]
    model = ModelConfig.preset(preset).replace(num_nextn_predict_layers=0)
    cfg = TrainConfig(max_steps=round(steps * budget), use_mtp=False, eval_every=max(25, round(steps / 12)))
    flops_per_token = model_stats(model, seq_len=cfg.seq_len).flops_per_token
    run = out / f"{arm}-{budget:g}x"
    if not (run / "model.safetensors").exists():  # a finished run is reused: the study can be resumed
        start = time.perf_counter()
        train(RunSpec(run, model, cfg, None), show_progress=False)
        print(f"{run.name}: {cfg.max_steps} steps in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"arm": arm, "preset": preset, "budget": budget, "step": r["step"],
             "train_flops": r["step"] * cfg.tokens_per_step * flops_per_token, "val_loss": r["val_loss"]}
            for r in rows if "val_loss" in r]


def iso_loss_flops(finals: list[tuple[float, float]], target: float) -> float | None:
    """FLOPs at which the (FLOPs, loss) curve reaches `target`, interpolating loss linearly in log FLOPs; None if it
    never does within the measured budgets."""
    finals = sorted(finals)
    for (f0, l0), (f1, l1) in zip(finals, finals[1:]):
        if l0 >= target >= l1:
            t = (l0 - target) / (l0 - l1) if l0 != l1 else 0.0
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
    return finals[0][0] if finals and finals[0][1] <= target else None


def plot(rows: list[dict], finals: dict[str, list[tuple[float, float]]], path: Path, ratio_text: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"deepseek": "tab:blue", "dense": "tab:orange"}
    for (arm, budget) in sorted({(r["arm"], r["budget"]) for r in rows}):
        run = [r for r in rows if r["arm"] == arm and r["budget"] == budget]
        ax.plot([r["train_flops"] for r in run], [r["val_loss"] for r in run], color=colors[arm], alpha=0.35,
                lw=1)
    for arm, points in finals.items():
        label = "MLA + DeepSeekMoE (tiny)" if arm == "deepseek" else "dense GQA + SwiGLU (tiny-dense)"
        ax.plot(*zip(*sorted(points)), "o-", color=colors[arm], label=f"{label}, end of each run")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a short log axis
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Same FLOPs per token, Shakespeare; {ratio_text}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study", help="run directories (finished runs are reused)")
    parser.add_argument("--docs", default="docs/study", help="where the CSV, PNG and JSON summary go")
    parser.add_argument("--steps", type=int, default=600, help="steps of a 1x budget (2,048 tokens each)")
    args = parser.parse_args()
    out, docs = Path(args.out), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    rows = [row for arm, (_, budgets) in ARMS.items() for budget in budgets
            for row in run_arm(out, arm, budget, args.steps)]
    finals = {arm: [(max(r["train_flops"] for r in rows if r["arm"] == arm and r["budget"] == b),
                     [r["val_loss"] for r in rows if r["arm"] == arm and r["budget"] == b][-1]) for b in budgets]
              for arm, (_, budgets) in ARMS.items()}
    deepseek_flops, deepseek_loss = dict(zip(ARMS["deepseek"][1], finals["deepseek"]))[1.0]
    dense_flops = iso_loss_flops(finals["dense"], deepseek_loss)
    ratio = dense_flops / deepseek_flops if dense_flops else None
    most = max(f for f, _ in finals["dense"]) / deepseek_flops
    ratio_text = f"iso-loss FLOP ratio {ratio:.2f}x" if ratio else f"iso-loss FLOP ratio > {most:.1f}x"
    with (docs / "dense_vs_deepseek.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, finals, docs / "dense_vs_deepseek.png", ratio_text)
    summary = {"iso_loss_flop_ratio": ratio, "deepseek_final_loss": deepseek_loss, "deepseek_flops": deepseek_flops,
               "dense_flops_to_match": dense_flops, "final_losses": finals,
               "train": dataclasses.asdict(TrainConfig(max_steps=args.steps, use_mtp=False)),
               "models": {arm: ModelConfig.preset(p).replace(num_nextn_predict_layers=0).to_hf_dict()
                          for arm, (p, _) in ARMS.items()}}
    (docs / "dense_vs_deepseek.json").write_text(json.dumps(summary, indent=2) + "\n")
    for arm, points in finals.items():
        print(arm, " ".join(f"{flops:.3g} FLOPs → {loss:.4f}" for flops, loss in points))
    print(f"DeepSeek arm at 1x: loss {deepseek_loss:.4f} with {deepseek_flops:.3g} FLOPs; dense needs "
          f"{dense_flops:.3g} FLOPs: {ratio_text}" if dense_flops else ratio_text)


if __name__ == "__main__":
    main()
