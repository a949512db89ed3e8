#!/usr/bin/env bash
# The CUDA paths in one go, on a machine with an NVIDIA GPU (CI never has one):
#
#   bash benchmarks/gpu_check.sh      # PYTHON=/path/to/python to use another interpreter with a CUDA torch
#
# 1. the tests marked `cuda` (no host sync in a training step, bf16 vs fp32, FP8 scaled_mm vs its emulation, the
#    serving engine in bf16);
# 2. one-GPU bf16 training of the `1b` preset (1.04B parameters, 0.27B active) through `nanoseek train`: tokens/s and
#    MFU of its last logged steps (the first steps, which compile kernels and fill allocators, are logged apart);
# 3. FP8 against bf16 on the same preset: step times of both, side by side (benchmarks/fp8_training.py).
# Exits non-zero if any part failed; each part still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${GPU_CHECK_OUT:-runs/gpu-check}
if ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check: this torch sees no CUDA device" >&2
  exit 2
fi
"$py" -c 'import torch; print("==", torch.cuda.get_device_name(), "torch", torch.__version__)'
status=0

echo "== 1. tests marked cuda"
"$py" -m pytest -q -m cuda tests || status=1

echo "== 2. bf16 training throughput, 1b preset, one GPU"
rm -rf "$out/bf16"
TQDM_DISABLE=1 "$py" -m nanoseek train --preset 1b --precision bf16 --out "$out/bf16" --max-steps 40 \
  --eval-every 1000 --save-every 1000 train.seq_len=1024 train.batch_size=16 train.log_every=20 \
  train.eval_batches=1 train.warmup_steps=10 || status=1
"$py" - "$out/bf16/metrics.jsonl" <<'PY' || status=1
import json, sys
last = [json.loads(line) for line in open(sys.argv[1])][-1]
print(f"bf16 training, 1b preset, batch 16 x 1024: {last['tokens_per_s']:.0f} tokens/s, "
      f"MFU {100 * last['mfu']:.1f} % (steps {last['step'] - 19}-{last['step']}, against the measured bf16 "
      f"matmul peak)")
PY

echo "== 3. FP8 vs bf16 step time, 1b preset"
"$py" benchmarks/fp8_training.py --step-time --preset 1b --batch 8 --seq 1024 || status=1
exit $status
