"""Round 2's report as markdown (docs/study2/report.md), written by the script that measured the runs, so that no
figure in it is copied by hand.
"""

from __future__ import annotations

import math

from studies.study_report import REFERENCE

GOAL = 2.0  # the multiplier at the top budget for the best arm


def _pm(value: float, error: float) -> str:
    return f"{value:.2f} ± {error:.2f}" if math.isfinite(error) else f"{value:.2f}"


def _bpb_by_seed(results: list[dict], arm: str, budget: float) -> str:
    runs = sorted((r for r in results if r["arm"] == arm and r["budget"] == budget), key=lambda r: r["seed"])
    return ", ".join(f"{r['bpb']:.3f}" for r in runs) or "–"


def _shape(a: dict) -> str:
    if not a["routed_experts"]:
        return "SwiGLU, every layer"
    return f"{a['routed_experts']} × {a['expert_width']}, top-{a['top_k']}"


def arms_table(summary: dict) -> list[str]:
    lines = [
        "| arm | routed experts × width | E/k | granularity 2h/w | total params | active | routed share of "
        "FLOPs | FLOPs/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in summary["arms"].items():
        lines.append(
            f"| {arm} | {_shape(a)} | {a['experts_to_top_k']:.0f} | {a['granularity']:.1f} | "
            f"{a['total_params'] / 1e6:.2f}M | {a['active_params'] / 1e6:.2f}M | "
            f"{100 * a['routed_flop_share']:.0f} % | {a['flops_per_token'] / 1e6:.2f}M |"
        )
    return lines


def multiplier_table(summary: dict) -> list[str]:
    budgets = list(next(a for arm, a in summary["arms"].items() if arm != REFERENCE)["multiplier_by_budget"])
    top = summary["top_budget"]
    lines = [
        "| arm | " + " | ".join(f"m at {b}" for b in budgets) + " | slope of log m vs log C | rises beyond "
        f"2 s.e.? | each {top} run against dense's fit |",
        "|---|" + "---|" * (len(budgets) + 3),
    ]
    for arm, a in summary["arms"].items():
        if arm == REFERENCE:
            continue
        cells = [
            _pm(p["multiplier"], p["se"]) + (" †" if p["dense_extrapolated"] else "")
            for p in a["multiplier_by_budget"].values()
        ]
        trend = a["multiplier_trend"]
        lines.append(
            f"| {arm} | " + " | ".join(cells) + f" | {trend['slope']:+.3f} ± {trend['se']:.3f} | "
            f"{'yes' if trend['rises_beyond_error'] else 'no'} | {_runs_at(a, top)} |"
        )
    return lines


def _runs_at(a: dict, budget: str) -> str:
    runs = sorted((r for r in a["multiplier_by_run"] if f"{r['budget']:g}x" == budget), key=lambda r: r["seed"])
    return ", ".join(f"{r['multiplier']:.2f}" for r in runs)


def bpb_table(summary: dict, results: list[dict]) -> list[str]:
    budgets = {r["budget"] for r in results}
    repeated = sorted(b for b in budgets if len({r["seed"] for r in results if r["budget"] == b}) > 1)
    seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in results}))
    lines = [
        "| arm | "
        + " | ".join(f"{b:g}x bpb (seeds {seeds})" for b in repeated)
        + " | iso-loss ratio at the target ± jackknife | GPU model bf16 / FP8 | CPU wall ratio |",
        "|---|" + "---|" * (len(repeated) + 3),
    ]
    for arm, a in summary["arms"].items():
        lines.append(
            f"| {arm} | "
            + " | ".join(_bpb_by_seed(results, arm, b) for b in repeated)
            + f" | {_pm(a['iso_loss_ratio'], a['iso_loss_ratio_jackknife_se'])} | "
            f"{a['gpu_iso_loss_ratio_bf16']:.2f} / {a['gpu_iso_loss_ratio_fp8']:.2f} | "
            f"{a['cpu_wall_iso_loss_ratio']:.2f} |"
        )
    return lines


def verdict(summary: dict) -> list[str]:
    top = summary["top_budget"]
    moe = {arm: a for arm, a in summary["arms"].items() if arm != REFERENCE}
    best = max(moe, key=lambda arm: moe[arm]["multiplier_by_budget"][top]["multiplier"])
    point = moe[best]["multiplier_by_budget"][top]
    rising = [arm for arm, a in moe.items() if a["multiplier_trend"]["rises_beyond_error"]]
    falling = [arm for arm, a in moe.items() if a["multiplier_trend"]["slope"] < -2 * a["multiplier_trend"]["se"]]
    met = point["multiplier"] >= GOAL
    return [
        f"- **Goal, ≥ {GOAL:g}× at the top budget ({top}) for the best arm: "
        f"{'met' if met else 'not met'}.** "
        f"The best arm there is {best}, at {_pm(point['multiplier'], point['se'])}×.",
        "- **Goal, a multiplier that rises with compute beyond its error: "
        + (f"met by {', '.join(rising)}.**" if rising else "met by no arm.**")
        + (f" It falls beyond its error for {', '.join(falling)}." if falling else ""),
    ]


def section(summary: dict, results: list[dict], images: str) -> str:
    """The whole section: corpus, arms, multipliers with their trend, raw losses, the law, the goal's verdict."""
    law, dense = summary["sparsity_law"], summary["arms"][REFERENCE]
    floor = dense["fit"]["c"]
    exponents = [a["fit"]["b"] for a in summary["arms"].values()]
    dense_budgets = [r["budget"] for r in results if r["arm"] == REFERENCE]
    batch = results[0]["tokens"] // results[0]["steps"] // summary["seq_len"]
    at_top, at_v3 = law["at_v3_sparsity_top_flops"], law["at_v3_sparsity_v3_flops"]
    moe = [a for arm, a in summary["arms"].items() if arm != REFERENCE]
    per_param = [a["tokens_per_active_param_at_top"] for a in moe]
    lines = [
        f"{summary['train_tokens']:,} training tokens (the default corpus, Shakespeare); a 1x budget "
        f"is {summary['steps_1x']} steps of {batch} × {summary['seq_len']} tokens, so the MoE arms' top budget "
        f"({summary['top_budget']}) takes {moe[0]['epochs_at_top']:.2f} epochs, "
        f"{min(per_param):.2f}–{max(per_param):.2f} tokens per active parameter, and dense's largest "
        f"{dense['epochs_at_top']:.2f} epochs. Every arm has dense's FLOPs per token within "
        f"{100 * _flop_spread(summary):.1f} %.",
        "",
        *arms_table(summary),
        "",
        *verdict(summary),
        "",
        f"![multiplier against compute, per arm]({images}/multiplier_vs_compute.png)",
        "",
        "The multiplier m(C) at each of an arm's budgets: the FLOPs dense's fit needs to reach the arm's fitted "
        "loss there, over the arm's FLOPs (± the seed-wise fits' standard error and the jackknife over "
        "budgets, in quadrature; † where that loss lies beyond dense's measured budgets). The slope is that of "
        "log m against log C over the arm's budgets. The last column reads each top-budget run (seeds in "
        "increasing order) against dense's fit alone.",
        "",
        *multiplier_table(summary),
        "",
        f"Fits: bpb(C) = a·C^(−b) + c per arm with one floor c = {floor:.3f} bits/byte for all; b = "
        f"{min(exponents):.3f}–{max(exponents):.3f}. The law over the sparsity sweep (errors as the "
        f"multipliers'): log m = {law['alpha']['value']:.3f} {law['beta']['value']:+.3f} (± "
        f"{law['beta']['se']:.3f}) · log(E/k) {law['gamma']['value']:+.3f} (± {law['gamma']['se']:.3f}) · "
        f"log(C / {law['top_flops']:.3g}). At V3's E/k = {law['v3_experts_to_top_k']:.0f} it gives "
        f"{_pm(at_top['value'], at_top['se'])}× at this study's top compute, and {at_v3['value']:.3g}× "
        f"(± {at_v3['se']:.2g}) extrapolated to V3's {law['v3_train_flops']:.2g} training FLOPs, where the "
        f"routed experts are {100 * law['v3_routed_flop_share']:.0f} % of a token's FLOPs: the direction of a "
        "trend over many orders of magnitude, not a forecast.",
        "",
        f"Held-out bits per byte where the seeds repeat, and round 1's reading: the iso-loss ratio at "
        f"{summary['target_bpb']:.3f} bits/byte (the highest of the arms' best fitted losses), the GPU cost "
        "model's ratios (`studies/study_cost.py`) and this CPU's wall-clock ratio.",
        "",
        *bpb_table(summary, results),
        "",
        f"Dense's largest budget ({max(dense_budgets):g}x, one seed), which keeps the multipliers at the top "
        f"inside dense's measured curve: {_bpb_by_seed(results, REFERENCE, max(dense_budgets))} bits/byte.",
        "",
        f"![held-out bits per byte against training FLOPs]({images}/sparsity_sweep.png)",
        "",
        f"The {len(results)} runs took {summary['total_wall_s'] / 60:.0f} min of training and evaluation; "
        f"`{images}/sparsity_sweep.csv` has one row per run, `{images}/sparsity_sweep.json` every config, fit, "
        "multiplier (`multiplier_by_budget`, `multiplier_trend`), `routed_flop_share` and `iso_loss_ratio`.",
    ]
    return "\n".join(lines) + "\n"


def _flop_spread(summary: dict) -> float:
    per_token = [a["flops_per_token"] for a in summary["arms"].values()]
    return max(per_token) / min(per_token) - 1
