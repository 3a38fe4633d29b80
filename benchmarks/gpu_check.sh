#!/bin/bash
# The device check (issue 30; benchmarks/gpu_check.py says what it measures). From a fresh
# checkout on a machine with one CUDA GPU and the package registry reachable:
#     bash benchmarks/gpu_check.sh [DATA_DIR]
# Under 10 minutes on an H100-class GPU once the models are fetched. Writes gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
export FLWR_TELEMETRY_ENABLED=0
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv
  # The CUDA build of the pinned torch (the Makefile pins the CPU one), then the lock.
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -r requirements.lock
  .venv/bin/pip install -q --no-deps -e .
fi
.venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else
  "gpu check: PyTorch sees no CUDA GPU (torch " + torch.__version__ + "); install a CUDA build")'
.venv/bin/fedcollm models --fetch qwen2.5-coder-0.5b qwen2.5-coder-1.5b
timeout 600 .venv/bin/python benchmarks/gpu_check.py --data-dir "$DATA" --out gpu_check.json
