"""Round 2's analysis: round 1's (studies/study_report.py: power laws with one floor, target-loss iso-loss ratios
with a jackknife, seeds, the GPU cost model) plus, per arm, its FLOP split and the multiplier at each of its budgets
with errors, the multiplier's trend with compute, and a law over the sparsity sweep; a plot of the multiplier
against compute.

The multiplier of an arm at compute C: m(C) = C_dense(L_arm(C)) / C, the FLOPs dense's fit needs to reach the loss
the arm's fit has at C, over C (Ling's efficiency leverage). Its errors: the standard error over the seed-wise fits
(each seed's runs where budgets repeat, the single runs elsewhere) and the jackknife over budgets, added in
quadrature. The trend: the least-squares slope of log m against log C over the arm's budgets, with the same errors.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.flops import model_stats  # noqa: E402
from nanoseek.presets import preset
from studies.scaling import PowerLaw, jackknife_error  # noqa: E402
from studies.study2_markdown import section  # noqa: E402
from studies.study_report import REFERENCE, _points, analyse, fit_study, write_report  # noqa: E402

V3_TOKENS = 14.8e12  # DeepSeek-V3's pretraining tokens (technical report)
REPORT_TITLE = "The compute study, round 2 (studies/study2.py)"


def routed_flop_share(model: ModelConfig, seq_len: int) -> float:
    """The routed experts' share of a token's training FLOPs (6 per active routed parameter)."""
    stats = model_stats(model, seq_len=seq_len)
    return 6 * stats.active_components["routed_experts"] / stats.flops_per_token


def _multipliers(fits: dict[str, PowerLaw] | None, arm: str, flops: list[float]) -> np.ndarray:
    if fits is None:
        return np.full(len(flops), math.nan)
    return np.array([fits[REFERENCE].flops_at(float(fits[arm].loss(c))) / c for c in flops])


def _slope(flops: list[float], multipliers: np.ndarray) -> float:
    if not np.all(np.isfinite(multipliers)) or np.any(multipliers <= 0):
        return math.nan
    return float(np.polyfit(np.log(flops), np.log(multipliers), 1)[0])


def _standard_error(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.std(finite, ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else math.nan


def _combined(seed_values: list[float], fold_values: list[float]) -> dict[str, float]:
    seed_se, fold_se = _standard_error(seed_values), jackknife_error(fold_values)
    return {"seed_se": seed_se, "jackknife_se": fold_se, "se": math.hypot(seed_se, fold_se)}


def analyse_round2(
    results: list[dict],
    models: dict[str, ModelConfig],
    steps: int,
    seq_len: int,
    groups: dict[str, list[str]],
    train_tokens: int,
) -> dict:
    """Round 1's summary of `results`, with round 2's additions under each arm and at the top level."""
    fitted = fit_study(results, list(models))
    runs, fits, by_seed, folds = fitted
    summary = analyse(results, {arm: (model, False) for arm, model in models.items()}, steps, seq_len, fitted)
    for arm, model in models.items():
        a = summary["arms"][arm]
        a["routed_flop_share"] = routed_flop_share(model, seq_len)
        a["experts_to_top_k"] = model.n_routed_experts / model.num_experts_per_tok if a["routed_experts"] else 0.0
        a["granularity"] = 2 * model.hidden_size / model.moe_intermediate_size if a["routed_experts"] else 0.0
        a["epochs_at_top"] = max(r["tokens"] for r in runs[arm]) / train_tokens
        a["tokens_per_active_param_at_top"] = max(r["tokens"] for r in runs[arm]) / a["active_params"]
        if arm == REFERENCE:
            continue
        budgets = sorted({r["budget"] for r in runs[arm]})
        flops = [next(r["train_flops"] for r in runs[arm] if r["budget"] == b) for b in budgets]
        central = _multipliers(fits, arm, flops)
        per_seed = {seed: _multipliers(f, arm, flops) for seed, f in by_seed.items()}
        per_fold = [_multipliers(f, arm, flops) for f in folds.values()]
        a["multiplier_by_budget"] = {
            f"{b:g}x": {
                "flops": c,
                "multiplier": float(central[i]),
                **_combined([float(m[i]) for m in per_seed.values()], [float(m[i]) for m in per_fold]),
                "by_seed": {str(s): float(m[i]) for s, m in per_seed.items()},
                "by_fold": [float(m[i]) for m in per_fold],
                # where dense's fit is read beyond dense's largest measured budget
                "dense_extrapolated": fits[REFERENCE].flops_at(float(fits[arm].loss(c)))
                > max(_points(runs[REFERENCE])[0]) * (1 + 1e-9),
            }
            for i, (b, c) in enumerate(zip(budgets, flops))
        }
        # each run read against dense's fit alone: the points the arm's own fit smooths over
        a["multiplier_by_run"] = [
            {
                "budget": r["budget"],
                "seed": r["seed"],
                "flops": r["train_flops"],
                "multiplier": fits[REFERENCE].flops_at(r["bpb"]) / r["train_flops"],
            }
            for r in runs[arm]
        ]
        a["multiplier_trend"] = {
            "slope": _slope(flops, central),
            **_combined([_slope(flops, m) for m in per_seed.values()], [_slope(flops, m) for m in per_fold]),
        }
        trend = a["multiplier_trend"]
        trend["rises_beyond_error"] = bool(trend["slope"] > 2 * trend["se"])
    summary["sparsity_law"] = sparsity_law(summary, groups["sparsity"], by_seed, models, seq_len)
    summary["groups"] = groups
    summary["train_tokens"] = train_tokens
    summary["top_budget"] = f"{max(r['budget'] for r in runs[groups['sparsity'][0]]):g}x"
    summary["text"] = round2_text(summary)
    return summary


def sparsity_law(summary: dict, arms: list[str], by_seed: dict, models: dict[str, ModelConfig], seq_len: int) -> dict:
    """log m = α + β·log(E/k) + γ·log(C / C_top), least squares over the sparsity sweep's (arm, budget) points.
    Its errors, as the multipliers': the law fitted on each seed's multipliers and on each jackknife fold's, in
    quadrature. Evaluated at V3's E/k (256/8) at this study's top compute, and at V3's own pretraining compute (an
    extrapolation over many orders of magnitude: a trend's direction, not a forecast)."""

    def fit(multiplier_of) -> np.ndarray:
        rows, targets = [], []
        for arm in arms:
            for point in summary["arms"][arm]["multiplier_by_budget"].values():
                m = multiplier_of(point)
                if math.isfinite(m) and m > 0:
                    rows.append(
                        [1.0, math.log(summary["arms"][arm]["experts_to_top_k"]), math.log(point["flops"] / top_flops)]
                    )
                    targets.append(math.log(m))
        if len(rows) < 3:
            return np.full(3, math.nan)
        return np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)[0]

    points = [p for arm in arms for p in summary["arms"][arm]["multiplier_by_budget"].values()]
    top_flops = max(p["flops"] for p in points)
    central = fit(lambda point: point["multiplier"])
    seeds = [fit(lambda point, s=str(seed): point["by_seed"][s]) for seed in by_seed]
    folds = [fit(lambda point, j=j: point["by_fold"][j]) for j in range(len(points[0]["by_fold"]))]
    v3 = preset("v3")
    v3_flops = model_stats(v3, seq_len=4096).flops_per_token * V3_TOKENS
    v3_sparsity = v3.n_routed_experts / v3.num_experts_per_tok

    def predict(coefficients: np.ndarray, flops: float) -> float:
        return float(np.exp(coefficients @ [1.0, math.log(v3_sparsity), math.log(flops / top_flops)]))

    def estimate(value_of) -> dict[str, float]:
        return {"value": value_of(central), **_combined([value_of(c) for c in seeds], [value_of(c) for c in folds])}

    return {
        "alpha": estimate(lambda c: float(c[0])),
        "beta": estimate(lambda c: float(c[1])),
        "gamma": estimate(lambda c: float(c[2])),
        "top_flops": top_flops,
        "v3_experts_to_top_k": v3_sparsity,
        "v3_train_flops": v3_flops,
        "v3_routed_flop_share": routed_flop_share(v3, 4096),
        "at_v3_sparsity_top_flops": estimate(lambda c: predict(c, top_flops)),
        "at_v3_sparsity_v3_flops": estimate(lambda c: predict(c, v3_flops)),
    }


def round2_text(summary: dict) -> str:
    top = summary["top_budget"]
    lines = [
        f"{'arm':<13} {'E/k':>4} {'G':>5} {'routed FLOPs':>12} {'total/active':>12} "
        f"{'m at 0.25x':>14} {'m at ' + top:>14} {'slope of log m':>16}  rises?"
    ]
    for arm, a in summary["arms"].items():
        if arm == REFERENCE:
            continue
        low, high = a["multiplier_by_budget"]["0.25x"], a["multiplier_by_budget"][top]
        trend = a["multiplier_trend"]
        lines.append(
            f"{arm:<13} {a['experts_to_top_k']:>4.0f} {a['granularity']:>5.1f} "
            f"{100 * a['routed_flop_share']:>11.0f}% {a['total_to_active']:>12.1f} "
            f"{low['multiplier']:>7.2f} ± {low['se']:<4.2f} {high['multiplier']:>7.2f} ± {high['se']:<4.2f}"
            f" {trend['slope']:>+8.3f} ± {trend['se']:<5.3f}  "
            f"{'yes' if trend['rises_beyond_error'] else 'no'}"
        )
    law = summary["sparsity_law"]
    dense = summary["arms"][REFERENCE]
    lines += [
        "",
        f"law over the sparsity sweep: log m = {law['alpha']['value']:.3f} {law['beta']['value']:+.3f}"
        f"(±{law['beta']['se']:.3f})·log(E/k) {law['gamma']['value']:+.3f}(±{law['gamma']['se']:.3f})"
        f"·log(C/{law['top_flops']:.3g})",
        f"at V3's E/k = {law['v3_experts_to_top_k']:.0f}: {law['at_v3_sparsity_top_flops']['value']:.2f}x "
        f"(±{law['at_v3_sparsity_top_flops']['se']:.2f}) at this study's top compute; "
        f"{law['at_v3_sparsity_v3_flops']['value']:.3g}x (±{law['at_v3_sparsity_v3_flops']['se']:.2g}) "
        f"extrapolated to V3's {law['v3_train_flops']:.2g} FLOPs (routed share there "
        f"{100 * law['v3_routed_flop_share']:.0f}%)",
        f"dense: routed share 0%, {dense['epochs_at_top']:.2f} epochs of {summary['train_tokens']:,} training "
        f"tokens at its largest budget",
        "",
        summary["text"],
    ]
    return "\n".join(lines)


def write_round2(results: list[dict], summary: dict, configs: dict, docs: Path) -> None:
    """Round 1's files (CSV, JSON, curves, ratios) from the extended summary, the multiplier plot, and report.md:
    the markdown section README shows (its images relative to `docs`)."""
    write_report(results, summary, configs, docs)
    plot_multipliers(summary, docs / "multiplier_vs_compute.png")
    (docs / "report.md").write_text(f"# {REPORT_TITLE}\n\n" + section(summary, results, "."))


def plot_multipliers(summary: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, (group, arms) in zip(axes, summary["groups"].items()):
        colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(arms)))
        for color, arm in zip(colors, arms):
            a = summary["arms"][arm]
            points = list(a["multiplier_by_budget"].values())
            label = f"E/k = {a['experts_to_top_k']:.0f}" if group == "sparsity" else f"G = {a['granularity']:.1f}"
            ax.errorbar(
                [p["flops"] for p in points],
                [p["multiplier"] for p in points],
                yerr=[p["se"] for p in points],
                fmt="o-",
                color=color,
                capsize=3,
                ms=4,
                label=f"{arm} ({label}, routed {100 * a['routed_flop_share']:.0f}% of FLOPs)",
            )
            ax.plot(
                [r["flops"] for r in a["multiplier_by_run"]],
                [r["multiplier"] for r in a["multiplier_by_run"]],
                "x",
                color=color,
                ms=4,
                alpha=0.5,
            )
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(2.0, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs of the MoE arm")
        ax.set_title(f"{group} sweep", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("dense's FLOPs ÷ the arm's at equal loss")
    fig.suptitle("multiplier from the fits (±1 s.e.); x: each run against dense's fit alone", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
