"""The compute study's analysis and report: per-arm fits of bits per byte against training FLOPs, iso-loss ratios
against dense with their jackknife errors, the seed spread, wall clock, the GPU cost model; CSV, JSON and two plots.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.flops import model_stats  # noqa: E402
from studies.scaling import PowerLaw, fit_power_laws, fits_without_each_budget, jackknife_error  # noqa: E402
from studies.study_cost import SOURCES, gpu_cost  # noqa: E402

REFERENCE = "dense"


def _points(runs: list[dict]) -> tuple[list[float], list[float], list[float]]:
    return [r["train_flops"] for r in runs], [r["bpb"] for r in runs], [r["budget"] for r in runs]


def _ratio(fits: dict[str, PowerLaw] | None, arm: str, target: float) -> float:
    if fits is None:
        return math.nan
    return fits[REFERENCE].flops_at(target) / fits[arm].flops_at(target)


def _one_seed(runs: list[dict], seed: int) -> list[dict]:
    """The runs as if only `seed` had run where a budget ran twice."""
    budgets = [r["budget"] for r in runs]
    repeated = {b for b in budgets if budgets.count(b) > 1}
    return [r for r in runs if r["budget"] not in repeated or r["seed"] == seed]


class StudyFits(NamedTuple):
    runs: dict[str, list[dict]]  # per arm, its runs' results
    fits: dict[str, PowerLaw]  # the joint fit of every run
    by_seed: dict[int, dict[str, PowerLaw]]  # per seed, the joint fit of that seed's runs where budgets repeat
    folds: dict[float, dict[str, PowerLaw] | None]  # the jackknife's refits, one per budget left out


def fit_study(results: list[dict], arms: list[str]) -> StudyFits:
    runs = {arm: [r for r in results if r["arm"] == arm] for arm in arms}
    seeds = sorted({r["seed"] for r in results})
    return StudyFits(
        runs,
        fit_power_laws({arm: _points(runs[arm])[:2] for arm in arms}),
        {seed: fit_power_laws({arm: _points(_one_seed(runs[arm], seed))[:2] for arm in arms}) for seed in seeds},
        fits_without_each_budget({arm: _points(runs[arm]) for arm in arms}),
    )


def analyse(
    results: list[dict],
    models: dict[str, tuple[ModelConfig, bool]],
    steps: int,
    seq_len: int,
    fitted: StudyFits | None = None,
) -> dict:
    """Everything the report shows, from the runs' results. `models`: per arm, its shape and whether MTP trains;
    `fitted`: fit_study's result when the caller has it already."""
    runs, fits, by_seed, folds = fitted or fit_study(results, list(models))
    # the loss every arm's fit reaches within its own measured budgets: the highest of their best losses
    target = max(float(fits[arm].loss(max(_points(runs[arm])[0]))) for arm in models)
    dense_runs = runs[REFERENCE]
    dense_at = {f"{r['budget']:g}x": float(fits[REFERENCE].loss(r["train_flops"])) for r in dense_runs}
    costs = {arm: gpu_cost(model, seq_len, use_mtp) for arm, (model, use_mtp) in models.items()}
    per_arm = {}
    for arm, (model, use_mtp) in models.items():
        fit, ratio = fits[arm], _ratio(fits, arm, target)
        fold_ratios = [_ratio(fold, arm, target) for fold in folds.values()]
        flops = _points(runs[arm])[0]
        stats = model_stats(model, seq_len=seq_len)
        cost = costs[arm]
        moe = model.is_moe_layer(model.num_hidden_layers - 1)  # the dense arms have no experts to report
        per_arm[arm] = {
            "routed_experts": model.n_routed_experts if moe else 0,
            "top_k": model.num_experts_per_tok if moe else 0,
            "expert_width": model.moe_intermediate_size if moe else 0,
            "mtp": use_mtp,
            "total_params": stats.total_params,
            "active_params": stats.active_params,
            "total_to_active": stats.total_params / stats.active_params,
            "flops_per_token": runs[arm][0]["flops_per_token"],
            "fit": fit.to_dict(),
            "fit_rms_bpb": _rms(fit, *_points(runs[arm])[:2]),
            "flops_at_target": fit.flops_at(target),
            "target_extrapolated": not min(flops) * (1 - 1e-9) <= fit.flops_at(target) <= max(flops) * (1 + 1e-9),
            "iso_loss_ratio": ratio,
            "iso_loss_ratio_jackknife_se": jackknife_error(fold_ratios),
            "iso_loss_ratio_folds": fold_ratios,
            "iso_loss_ratio_by_seed": {
                str(seed): _ratio(seed_fits, arm, target) for seed, seed_fits in by_seed.items()
            },
            "iso_loss_ratio_by_dense_budget": {b: _ratio(fits, arm, loss) for b, loss in dense_at.items()},
            "seeds": _seed_spread(runs[arm]),
            "wall_s": sum(r["wall_s"] for r in runs[arm]),
            "cpu_seconds_per_pflop": _seconds_per_flop(runs[arm]) * 1e15,
            "cpu_wall_iso_loss_ratio": ratio * _seconds_per_flop(dense_runs) / _seconds_per_flop(runs[arm]),
            "gpu": cost,
            # GPU seconds to the target: FLOPs to reach it times seconds per FLOP, dense's over this arm's
            **{
                f"gpu_iso_loss_ratio_{name}": ratio
                * (costs[REFERENCE][f"seconds_per_token_{dense_format}"] / dense_runs[0]["flops_per_token"])
                / (cost[f"seconds_per_token_{arm_format}"] / runs[arm][0]["flops_per_token"])
                for name, dense_format, arm_format in (
                    ("bf16", "bf16", "bf16"),
                    ("fp8", "fp8", "fp8"),
                    ("dense_bf16_vs_fp8", "bf16", "fp8"),
                )
            },
        }
    summary = {
        "steps_1x": steps,
        "seq_len": seq_len,
        "target_bpb": target,
        "dense_fitted_bpb_by_budget": dense_at,
        "arms": per_arm,
        "total_wall_s": sum(r["wall_s"] for r in results),
        "gpu_cost_sources": SOURCES,
    }
    summary["text"] = summary_text(summary)
    return summary


def _seed_spread(runs: list[dict]) -> dict[str, dict]:
    """Per budget that ran more than once: each seed's bits per byte and their spread (max − min)."""
    spread = {}
    for budget in sorted({r["budget"] for r in runs}):
        values = [r["bpb"] for r in runs if r["budget"] == budget]
        if len(values) > 1:
            spread[f"{budget:g}x"] = {"bpb": values, "spread": max(values) - min(values)}
    return spread


def _seconds_per_flop(runs: list[dict]) -> float:
    """Wall clock per training FLOP of an arm's runs on the machine that ran the study (each run's whole train():
    setup, steps, its evaluation and checkpoint)."""
    return sum(r["wall_s"] for r in runs) / sum(r["train_flops"] for r in runs)


def _rms(fit: PowerLaw, flops: list[float], losses: list[float]) -> float:
    return float(np.sqrt(np.mean((fit.loss(np.asarray(flops)) - np.asarray(losses)) ** 2)))


def summary_text(summary: dict) -> str:
    lines = [
        f"target: {summary['target_bpb']:.4f} bits/byte (every arm's fit reaches it within its budgets)",
        f"{'arm':<11} {'total/active':>12} {'iso-loss ratio ± s.e.':>22} {'per seed':>13} {'1x bpb spread':>13} "
        f"{'CPU wall':>8} {'GPU bf16':>8} {'GPU fp8':>8} {'minutes':>7}",
    ]
    for arm, a in summary["arms"].items():
        spread = a["seeds"].get("1x", {}).get("spread", math.nan)
        per_seed = " / ".join(f"{v:.2f}" for v in a["iso_loss_ratio_by_seed"].values())
        lines.append(
            f"{arm:<11} {a['total_to_active']:>12.2f} {a['iso_loss_ratio']:>14.2f}x ± "
            f"{a['iso_loss_ratio_jackknife_se']:<4.2f} {per_seed:>13} {spread:>13.4f} "
            f"{a['cpu_wall_iso_loss_ratio']:>7.2f}x {a['gpu_iso_loss_ratio_bf16']:>7.2f}x "
            f"{a['gpu_iso_loss_ratio_fp8']:>7.2f}x {a['wall_s'] / 60:>7.1f}"
        )
    lines.append(f"total wall clock of the runs: {summary['total_wall_s'] / 60:.1f} min")
    return "\n".join(lines)


def write_report(results: list[dict], summary: dict, configs: dict, docs: Path) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    with (docs / "sparsity_sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in results[0] if k != "configs"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)
    (docs / "sparsity_sweep.json").write_text(json.dumps({**summary, "configs": configs}, indent=1) + "\n")
    plot_curves(results, summary, docs / "sparsity_sweep.png")
    plot_ratios(summary, docs / "iso_loss_ratio.png")


def plot_curves(results: list[dict], summary: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(summary["arms"]) - 1))
    for color, (arm, a) in zip(["tab:red", *colors], summary["arms"].items()):
        flops, bpb, _ = _points([r for r in results if r["arm"] == arm])
        fit = PowerLaw(**a["fit"])
        grid = np.geomspace(min(flops) * 0.8, max(flops) * 1.25, 100)
        style = "--" if a["mtp"] else "-"
        ax.plot(grid, fit.loss(grid), style, color=color, lw=1.2)
        ax.plot(
            flops,
            bpb,
            "o",
            color=color,
            ms=4,
            label=f"{arm} ({a['total_to_active']:.1f}× total/active): {a['iso_loss_ratio']:.2f}×",
        )
    ax.axhline(summary["target_bpb"], color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (MTP's included)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(
        "Equal FLOPs per token; fits a·C^-b + c (one c for all arms); legend: iso-loss ratio vs dense "
        "at the dotted line",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ratios(summary: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, a in summary["arms"].items():
        marker = "s" if a["mtp"] else ("D" if arm == REFERENCE else "o")
        ax.errorbar(
            a["total_to_active"],
            a["iso_loss_ratio"],
            yerr=a["iso_loss_ratio_jackknife_se"],
            fmt=marker,
            capsize=3,
            label=arm,
        )
        ax.annotate(
            arm, (a["total_to_active"], a["iso_loss_ratio"]), textcoords="offset points", xytext=(6, 4), fontsize=8
        )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("total / active parameters")
    ax.set_ylabel("iso-loss compute ratio vs dense (×)")
    ax.set_title("FLOPs dense needs ÷ FLOPs each arm needs, at one target loss (±1 jackknife s.e.)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
