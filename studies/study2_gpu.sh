#!/usr/bin/env bash
# The compute study's second round at its GPU scale, on one H200 (or any CUDA GPU with ~40 GB):
#
#   bash studies/study2_gpu.sh                 # PYTHON=/path/to/python for an interpreter with a CUDA torch
#   bash studies/study2_gpu.sh --quick         # options go to studies/study2.py (see its --help)
#
# The same arms and seeds as the CPU study (studies/study2.py), twice the width and depth, 32 x 512 tokens a step
# in bf16, budgets 0.25 ... 4x (each ~115x the CPU budget's compute); it prints its training FLOPs against the whole
# CPU study's first. Finished runs are reused, so an interrupted study goes on from where it stopped; each is also a
# line of runs/study2-gpu/report/runs.jsonl, the file to bring back from a lent machine. The report lands beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' || { echo "study2_gpu: no CUDA GPU" >&2; exit 1; }
exec "$py" -m studies.study2 --scale gpu "$@"
