"""The CUDA paths in one go, on a machine with NVIDIA GPUs (CI never has one); `gpu_check.sh` runs it.

One model throughout: the `--preset` (default `1b`) with the default corpus's 4,096-token tokenizer, so that every
figure below is of the same network.
1. the tests marked `cuda` (tests/test_cuda.py: the trainer's step without host syncs, FP8 GEMMs against their
   emulation at PyTorch's own tolerances, the experts' scaled grouped GEMM, TF32, bf16 serving);
2. training through `nanoseek train` on one GPU in bf16 and in FP8: tokens/s, step time and MFU over the 50 steps
   after the first --warmup ones (the trainer's 50-step throughput window, logged every --warmup steps, then covers
   exactly those);
3. the same under torchrun on every GPU (--dp all, --ep all), where there are several;
4. serving: the bf16 run's model in the engine, decode tokens/s with a warm-up request first.
Writes OUT/gpu_check.json; exits 1 if any part failed (each part still runs).

    python benchmarks/gpu_check.py --out runs/gpu-check
    python benchmarks/gpu_check.py --preset tiny --seq 64 --batch 2 --warmup 2 --allow-cpu   # the plumbing, on a CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TIMED_STEPS = 50  # the trainer's throughput window


def run(command: list[str], log: Path) -> bool:
    """A command with its output in `log`; whether it succeeded."""
    with open(log, "w") as f:
        ok = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode == 0
    print(f"   {'ok' if ok else 'FAILED'}: {' '.join(command[:6])} … (log: {log})", flush=True)
    return ok


def train(out: Path, name: str, args: argparse.Namespace, precision: str, processes: int) -> dict[str, Any]:
    """`nanoseek train` for --warmup + TIMED_STEPS steps; its last metrics row covers the last TIMED_STEPS."""
    target = out / name
    shutil.rmtree(target, ignore_errors=True)
    launcher = (
        [sys.executable]
        if processes == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    )
    parallel = [] if processes == 1 else ["--ep", str(processes)]
    steps = args.warmup + TIMED_STEPS
    command = [
        *launcher,
        "-m",
        "nanoseek",
        "train",
        "--preset",
        args.preset,
        "--out",
        str(target),
        "--max-steps",
        str(steps),
        *parallel,
        f"train.precision={precision}",
        f"train.seq_len={args.seq}",
        f"train.batch_size={args.batch * processes}",
        f"train.log_every={args.warmup}",
        f"train.eval_every={steps}",
        "train.eval_batches=1",
        f"train.save_every={steps}",
        f"train.warmup_steps={args.warmup}",
        f"train.tf32={args.tf32}",
    ]
    if not run(command, out / f"{name}.log"):
        return {"ok": False}
    row = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()][-1]
    tokens_per_step = args.seq * args.batch * processes
    result = {
        "ok": row["tokens_per_s_steps"] == TIMED_STEPS,
        "tokens_per_s": row["tokens_per_s"],
        "step_ms": 1e3 * tokens_per_step / row["tokens_per_s"],
        "mfu": row["mfu"],
        "mfu_peak": row["mfu_peak"],
        "steps_timed": row["tokens_per_s_steps"],
        "loss": row["loss"],
    }
    print(
        f"   {name}: {result['tokens_per_s']:,.0f} tokens/s, {result['step_ms']:.0f} ms/step, MFU "
        f"{100 * result['mfu']:.1f} % over steps {args.warmup + 1}-{steps}",
        flush=True,
    )
    return result


def serve(model_dir: Path, device: torch.device, prompts: int, new_tokens: int) -> dict[str, Any]:
    """Decode throughput of the trained model in the engine (bf16 on a GPU), after one warm-up request."""
    import nanoseek
    from nanoseek.infer.engine import Engine
    from nanoseek.infer.request import SamplingParams

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = nanoseek.load_pretrained(model_dir).to(device=device, dtype=dtype).eval()
    engine = Engine(model)
    batch = [[3 + (i * 7 + j) % 200 for j in range(64)] for i in range(prompts)]
    params = SamplingParams(max_new_tokens=new_tokens, min_tokens=new_tokens)
    engine.generate(batch[:1], SamplingParams(max_new_tokens=8))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    completions = engine.generate(batch, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    print(
        f"   serving: {prompts} prompts of 64 tokens, {new_tokens} new each: {tokens / seconds:,.0f} tokens/s",
        flush=True,
    )
    return {
        "ok": tokens == prompts * new_tokens,
        "tokens_per_s": tokens / seconds,
        "prompts": prompts,
        "new_tokens": new_tokens,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of every figure (1-50)")
    parser.add_argument("--tf32", action="store_true", help="train.tf32=true in the training runs")
    parser.add_argument("--allow-cpu", action="store_true", help="run on a CPU (checks this script, not a GPU)")
    args = parser.parse_args()
    if not 0 < args.warmup <= TIMED_STEPS:
        parser.error(f"--warmup must lie in 1-{TIMED_STEPS}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        raise SystemExit("gpu_check: this torch sees no CUDA device (--allow-cpu checks the script on a CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if cuda else 1
    summary: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": gpus,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    print(f"== {summary['device']} x{gpus}, torch {summary['torch']}, CUDA {summary['cuda']}", flush=True)
    print("== 1. tests marked cuda", flush=True)
    summary["tests"] = {
        "ok": run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"], args.out / "tests.log")
    }
    print(f"== 2. training on one {'GPU' if cuda else 'CPU'}: bf16, then FP8", flush=True)
    summary["train_bf16"] = train(args.out, "bf16", args, "bf16", 1)
    summary["train_fp8"] = train(args.out, "fp8", args, "fp8", 1)
    if summary["train_bf16"]["ok"] and summary["train_fp8"]["ok"]:
        summary["fp8_over_bf16_step_time"] = summary["train_fp8"]["step_ms"] / summary["train_bf16"]["step_ms"]
        print(f"   FP8 / bf16 step time: {summary['fp8_over_bf16_step_time']:.2f}", flush=True)
    if gpus > 1:
        print(f"== 3. training on {gpus} GPUs (DP {gpus} x EP {gpus}), bf16", flush=True)
        summary[f"train_bf16_{gpus}gpus"] = train(args.out, f"bf16-{gpus}gpus", args, "bf16", gpus)
    print("== 4. serving the bf16 model", flush=True)
    if summary["train_bf16"]["ok"]:
        summary["serve"] = serve(
            args.out / "bf16", torch.device("cuda" if cuda else "cpu"), 32 if cuda else 4, 128 if cuda else 8
        )
    failed = sorted(k for k, v in summary.items() if isinstance(v, dict) and v.get("ok") is False)
    summary["failed"] = failed
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"== summary: {args.out / 'gpu_check.json'}; {'failed: ' + ', '.join(failed) if failed else 'all passed'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
