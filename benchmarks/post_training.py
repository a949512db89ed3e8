"""The whole pipeline in one command, on a CPU: pretrain (or reuse a run) → SFT → RL (GRPO) → eval, with a report
card in the manner of nanochat's. Each stage is the `nanoseek` command a user would run:

    .venv/bin/python benchmarks/post_training.py                    # pretrains the tiny preset first (~6 min)
    .venv/bin/python benchmarks/post_training.py --base runs/tiny   # reuses a pretrained run

Then it serves the RL model with `nanoseek serve` and asks it a question through the official openai client, to
show the format it was tuned on. Writes OUT/report.md and OUT/report.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path


def nanoseek(*args: str) -> float:
    """Runs a nanoseek command, → its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nanoseek", *args], check=True)
    return time.perf_counter() - start


def evaluate(model: Path, task: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "nanoseek", "eval", str(model), "--task", task, "--n", str(n),
                          "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def ask_served(model: Path, question: str) -> str:
    import httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", str(model), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(model=model.resolve().name, temperature=0, max_tokens=64,
                                               messages=[{"role": "user", "content": question}])
        return reply.choices[0].message.content
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="a pretrained run to start from (default: pretrain one)")
    parser.add_argument("--out", type=Path, default=Path("runs/post"))
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--n", type=int, default=500, help="held-out problems per evaluation")
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--rl-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    base = args.base
    if base is None:
        base = args.out / "base"
        if not (base / "model.safetensors").exists():
            seconds["pretrain"] = nanoseek("train", "--preset", "tiny", "--out", str(base))
    sft, rl = args.out / "sft", args.out / "rl"
    if not (sft / "model.safetensors").exists():
        seconds["sft"] = nanoseek("sft", str(base), "--task", args.task, "--task-examples", "8000", "--out",
                                  str(sft), "--max-steps", str(args.sft_steps), "--batch-size", "32", "--lr", "2e-3",
                                  "--seed", str(args.seed))
    if not (rl / "model.safetensors").exists():
        seconds["rl"] = nanoseek("rl", str(sft), "--task", args.task, "--out", str(rl), "--max-steps",
                                 str(args.rl_steps), "--batch-size", "32", "--lr", "1e-4", "--token-mean",
                                 "--seed", str(args.seed))
    start = time.perf_counter()
    stages = {"base": base, "sft": sft, "rl": rl}
    results = {name: evaluate(path, args.task, args.n) for name, path in stages.items()}
    bpb = {name: evaluate(path, "bpb", 100)["bpb"] for name, path in stages.items()}
    seconds["eval"] = time.perf_counter() - start
    question = "What is 58 + 67?"
    answers = {name: ask_served(stages[name], question) for name in ("sft", "rl")}
    lines = [f"| stage | {args.task} pass@1 (greedy, {args.n} held-out) | layout followed | bits per byte |",
             "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['accuracy']:.4f} ± {r['stderr']:.4f} | {100 * r['format_rate']:.1f} % | "
                     f"{bpb[name]:.3f} |")
    gain = results["rl"]["accuracy"] - results["sft"]["accuracy"]
    lines += ["", f"RL − SFT: {100 * gain:+.1f} points", "",
              "| stage | minutes |", "|---|---|"] + [f"| {k} | {v / 60:.1f} |" for k, v in seconds.items()]
    lines += [""] + [f"`nanoseek serve {stages[name]}`, asked {question!r} through the openai client: {reply!r}"
                     for name, reply in answers.items()]
    report = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(report)
    (args.out / "report.json").write_text(json.dumps({"results": results, "bpb": bpb, "seconds": seconds,
                                                      "served_answers": answers}, indent=2) + "\n")
    print(report)


if __name__ == "__main__":
    main()
