"""The whole pipeline on a CPU, over several seeds: pretrain (or reuse a run) → SFT → RL (GRPO) → eval, with a
report card in the manner of nanochat's. Each stage is the `nanoseek` command a user would run:

    .venv/bin/python benchmarks/post_training.py --report docs/post            # pretrains the tiny preset first
    .venv/bin/python benchmarks/post_training.py --base runs/tiny --seeds 0 1 2

Per seed: `nanoseek sft` (the task's sft split + the demo dialogs), then `nanoseek rl` from it (the task's rl split),
which every --eval-every steps measures pass@1 on the task's validation split and keeps the model. The RL step
count is chosen once for all seeds, as the step with the best mean validation accuracy (step 0 is the SFT model
itself); only then are the SFT and chosen RL models of every seed evaluated on the test split, once. The report
gives each seed's figures and mean ± standard error over seeds (RL − SFT paired by seed). It ends by serving a RL
model with `nanoseek serve` and asking it a question through the official openai client.

Writes REPORT/report.md and REPORT/report.json (REPORT: --report, default OUT); nothing in them is written by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path


def nanoseek(*args: str) -> float:
    """Runs a nanoseek command, → its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nanoseek", *args], check=True)
    return time.perf_counter() - start


def evaluate(model: Path, task: str, n: int, split: str = "test") -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nanoseek",
            "eval",
            str(model),
            "--task",
            task,
            "--n",
            str(n),
            "--split",
            split,
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def ask_served(model: Path, question: str) -> str:
    import openai

    from nanoseek.infer.launch import start_serve

    server, base = start_serve(model)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        reply = client.chat.completions.create(
            model=model.resolve().name, temperature=0, max_tokens=64, messages=[{"role": "user", "content": question}]
        )
        return reply.choices[0].message.content
    finally:
        server.terminate()
        server.wait(timeout=60)


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """→ mean, standard error of the mean (0 for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def validation_curve(sft: Path, rl: Path, task: str, n: int) -> dict[int, float]:
    """Validation pass@1 by RL step: step 0 is the SFT model, then what `nanoseek rl --validation` logged."""
    curve = {0: evaluate(sft, task, n, "validation")["accuracy"]}
    for line in (rl / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_accuracy" in row:
            curve[row["step"]] = row["val_accuracy"]
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="a pretrained run to start from (default: pretrain one)")
    parser.add_argument("--out", type=Path, default=Path("runs/post"))
    parser.add_argument("--report", type=Path, help="where report.md / report.json go (default: --out)")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=1000, help="test problems per evaluation")
    parser.add_argument("--validation", type=int, default=300, help="validation problems per RL evaluation")
    parser.add_argument("--task-examples", type=int, default=6000, help="SFT's worked examples (distinct)")
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--rl-steps", type=int, default=400)
    parser.add_argument("--rl-eval-every", type=int, default=50)
    parser.add_argument(
        "--earlier",
        type=Path,
        help="the report.json of an earlier invocation whose test figures "
        "were seen before this one's settings were chosen: the report says so, with its figures",
    )
    args = parser.parse_args()
    earlier = json.loads(args.earlier.read_text()) if args.earlier else None
    args.out.mkdir(parents=True, exist_ok=True)
    report_dir = args.report or args.out
    seconds: dict[str, float] = {}
    base = args.base
    if base is None:
        base = args.out / "base"
        if not (base / "model.safetensors").exists():
            seconds["pretrain"] = nanoseek("train", "--preset", "tiny", "--out", str(base))
    runs = {seed: (args.out / f"sft-seed{seed}", args.out / f"rl-seed{seed}") for seed in args.seeds}
    for seed, (sft, rl) in runs.items():
        if not (sft / "model.safetensors").exists():
            seconds[f"sft seed {seed}"] = nanoseek(
                "sft",
                str(base),
                "--task",
                args.task,
                "--task-examples",
                str(args.task_examples),
                "--out",
                str(sft),
                "--max-steps",
                str(args.sft_steps),
                "--batch-size",
                "32",
                "--lr",
                "2e-3",
                "--seed",
                str(seed),
            )
        if not (rl / "model.safetensors").exists():  # an interrupted run (a checkpoint, no model) goes on
            resume = ["--resume"] if any((rl / "checkpoints").glob("step_*")) else []
            seconds[f"rl seed {seed}"] = nanoseek(
                "rl",
                str(sft),
                "--task",
                args.task,
                "--out",
                str(rl),
                "--max-steps",
                str(args.rl_steps),
                "--batch-size",
                "32",
                "--lr",
                "1e-4",
                "--token-mean",
                "--seed",
                str(seed),
                "--validation",
                str(args.validation),
                "--eval-every",
                str(args.rl_eval_every),
                *resume,
            )
    start = time.perf_counter()
    curves = {seed: validation_curve(sft, rl, args.task, args.validation) for seed, (sft, rl) in runs.items()}
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    mean_curve = {step: statistics.fmean(c[step] for c in curves.values()) for step in steps}
    chosen = max(steps, key=lambda step: (mean_curve[step], -step))  # the earliest of equal bests
    chosen_models = {seed: sft if chosen == 0 else rl / "steps" / f"{chosen:06d}" for seed, (sft, rl) in runs.items()}
    test = {
        seed: {"sft": evaluate(sft, args.task, args.n), "rl": evaluate(chosen_models[seed], args.task, args.n)}
        for seed, (sft, _) in runs.items()
    }
    bpb = {"base": evaluate(base, "bpb", 100)["bpb"]}
    for seed, (sft, _) in runs.items():
        bpb[f"sft seed {seed}"] = evaluate(sft, "bpb", 100)["bpb"]
        bpb[f"rl seed {seed}"] = evaluate(chosen_models[seed], "bpb", 100)["bpb"]
    base_test = evaluate(base, args.task, args.n)
    seconds["eval"] = time.perf_counter() - start
    question = "What is 58 + 67?"
    first = args.seeds[0]
    answers = {
        name: ask_served(path, question) for name, path in (("sft", runs[first][0]), ("rl", chosen_models[first]))
    }
    summary = {stage: mean_and_error([test[s][stage]["accuracy"] for s in args.seeds]) for stage in ("sft", "rl")}
    gain = mean_and_error([test[s]["rl"]["accuracy"] - test[s]["sft"]["accuracy"] for s in args.seeds])
    write_report(
        report_dir,
        args,
        base_test,
        test,
        summary,
        gain,
        curves,
        mean_curve,
        chosen,
        bpb,
        seconds,
        question,
        answers,
        earlier,
    )


def earlier_lines(earlier: dict, args: argparse.Namespace) -> list[str]:
    """What an earlier invocation measured on the same test split before this one's settings were chosen."""
    then = earlier["settings"]
    changed = {
        k: (then.get(k), v)
        for k, v in vars(args).items()
        if k not in ("earlier", "report", "out", "base") and str(then.get(k)) != str(v)
    }
    gain, error = earlier["rl_minus_sft"]
    return [
        "",
        f"Not a first look at this test split: an earlier invocation ({args.earlier}) measured RL − SFT "
        f"{100 * gain:+.1f} ± {100 * error:.1f} points on it (RL's step count {earlier['chosen_rl_steps']}); "
        "this invocation's settings were chosen after seeing that figure. Changed since: "
        + (", ".join(f"{k} {a} → {b}" for k, (a, b) in changed.items()) or "nothing")
        + ".",
    ]


def write_report(
    report_dir: Path,
    args: argparse.Namespace,
    base_test: dict,
    test: dict,
    summary: dict,
    gain: tuple[float, float],
    curves: dict,
    mean_curve: dict,
    chosen: int,
    bpb: dict,
    seconds: dict,
    question: str,
    answers: dict,
    earlier: dict | None,
) -> None:
    seeds = args.seeds
    lines = [
        f"{args.task}, pass@1 (greedy) on {args.n} test problems, {len(seeds)} seeds ({', '.join(map(str, seeds))});"
        f" RL's step count ({chosen}) chosen on {args.validation} validation problems (mean over seeds):",
        "",
        "| stage | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± s.e. |",
        "|---|" + "---|" * (len(seeds) + 1),
        "| base | " + " | ".join("–" for _ in seeds) + f" | {base_test['accuracy']:.4f} (one model) |",
    ]
    for stage in ("sft", "rl"):
        mean, error = summary[stage]
        lines.append(
            f"| {stage} | "
            + " | ".join(f"{test[s][stage]['accuracy']:.4f}" for s in seeds)
            + f" | {mean:.4f} ± {error:.4f} |"
        )
    lines += ["", f"RL − SFT: {100 * gain[0]:+.1f} ± {100 * gain[1]:.1f} points (mean ± s.e. over seeds, paired)"]
    lines += earlier_lines(earlier, args) if earlier else []
    lines += [
        "",
        "Validation pass@1 by RL step (step 0: the SFT model):",
        "",
        "| step | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for step, mean in mean_curve.items():
        mark = " (chosen)" if step == chosen else ""
        lines.append(f"| {step}{mark} | " + " | ".join(f"{curves[s][step]:.3f}" for s in seeds) + f" | {mean:.3f} |")
    lines += ["", "| model | bits per byte |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in bpb.items()]
    lines += ["", "| stage | minutes |", "|---|---|"] + [f"| {k} | {v / 60:.1f} |" for k, v in seconds.items()]
    lines += [
        "",
        "A stage missing from this table was not run by this invocation: its model was already in "
        f"{args.out} (pretraining and SFT are reused when only RL's settings change); a resumed stage "
        "counts only this invocation's part.",
    ]
    lines += [""] + [
        f"`nanoseek serve` the {name} model of seed {seeds[0]}, asked {question!r} through the openai client: {reply!r}"
        for name, reply in answers.items()
    ]
    report = "\n".join(lines) + "\n"
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.md").write_text(report)
    (report_dir / "report.json").write_text(
        json.dumps(
            {
                "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "base_test": base_test,
                "test": {str(s): v for s, v in test.items()},
                "mean_and_stderr": summary,
                "rl_minus_sft": gain,
                "validation_curves": {str(s): c for s, c in curves.items()},
                "chosen_rl_steps": chosen,
                "earlier": earlier and {k: earlier[k] for k in ("settings", "rl_minus_sft", "chosen_rl_steps")},
                "bpb": bpb,
                "seconds": seconds,
                "served_answers": answers,
            },
            indent=2,
        )
        + "\n"
    )
    print(report)


if __name__ == "__main__":
    main()
