"""Training throughput of one process vs data parallel (DP2) vs expert parallel (EP2) on this machine, and the
bytes the expert all-to-all moves per step.

    .venv/bin/python benchmarks/distributed_throughput.py [--preset small] [--steps 8] [--batch 8] [--seq 256]

Each run trains the same global batch; tokens/s is the median over steps after the first two. On a 2-core CPU the
two processes share the cores the single process uses (torchrun gives each one thread), so this measures overhead
more than scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(processes: int, extra: list[str], out: Path, args: argparse.Namespace) -> list[dict]:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    command = launcher + [
        "-m",
        "nanoseek",
        "train",
        "--preset",
        args.preset,
        "--out",
        str(out),
        "--max-steps",
        str(args.steps),
        "--save-every",
        "100000",
        "--eval-every",
        "100000",
        f"train.batch_size={args.batch}",
        f"train.seq_len={args.seq}",
        "train.log_every=1",
        "train.eval_batches=1",
        *extra,
    ]
    subprocess.run(command, check=True, env={**os.environ, "TQDM_DISABLE": "1"}, capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, processes, extra in (("1 process", 1, []), ("DP2", 2, []), ("EP2", 2, ["--ep", "2"])):
            rows = run(processes, extra, Path(tmp) / name.replace(" ", "-"), args)[2:]
            results[name] = (
                statistics.median(r["tokens_per_s"] for r in rows),
                statistics.median(r.get("a2a_bytes", 0) for r in rows),
                rows[-1]["loss"],
            )
    base = results["1 process"][0]
    print(f"preset {args.preset}, global batch {args.batch} x {args.seq}, {args.steps} steps")
    for name, (tps, a2a, loss) in results.items():
        note = f", all-to-all {a2a / 2**20:.1f} MiB/step per rank" if a2a else ""
        print(f"{name:<10} {tps:8.0f} tok/s  ({tps / base:.2f}x){note}  last loss {loss:.4f}")


if __name__ == "__main__":
    main()
