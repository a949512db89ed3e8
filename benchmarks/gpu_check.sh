#!/usr/bin/env bash
# The CUDA paths in one go, on a machine with NVIDIA GPUs (CI never has one):
#
#   bash benchmarks/gpu_check.sh                 # PYTHON=/path/to/python for another interpreter with a CUDA torch
#   bash benchmarks/gpu_check.sh --tf32          # options go to benchmarks/gpu_check.py (see its --help)
#
# Installs the test extra first if pytest is missing, then runs benchmarks/gpu_check.py: the `cuda` tests, bf16 and
# FP8 training of one model (warm-up left out of the figures), every GPU under torchrun where there are several,
# and serving; its JSON summary lands in runs/gpu-check/gpu_check.json. Exits non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" -c 'import pytest' 2>/dev/null || "$py" -m pip install -q -e ".[test]"
exec "$py" benchmarks/gpu_check.py "$@"
