#!/usr/bin/env bash
# GPU check for a machine with a CUDA GPU: train a few steps on CUDA, export that
# model to ONNX, check onnxruntime's parity with torch. CI never runs this.
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --device cpu   # the same steps without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# The repository root on the path: fedscale imports from the checkout (no install).
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec python3 bench/gpu_check.py "$@"
