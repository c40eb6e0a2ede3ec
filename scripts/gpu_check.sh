#!/usr/bin/env bash
# The CUDA checks, for a machine with an NVIDIA GPU and this project's dependencies installed:
#   1. the test suite on the GPU: the trainers then run on cuda through accelerate, the fp16 tests un-skip, and
#      tests/conftest.py turns on deterministic kernels (no TF32, math attention) for the equivalence tests;
#   2. the tiny pipeline's training throughput on the GPU against a minimal diffusers + peft loop
#      (benchmarks/results/sdxl_throughput_cuda.json unless --out says otherwise).
#
#   bash scripts/gpu_check.sh [pytest args...]      e.g.  bash scripts/gpu_check.sh tests/test_train_sdxl.py
#
# Env: PYTHON picks the interpreter (default: python); GPU_CHECK_BENCH=0 skips step 2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"

"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (torch " + torch.__version__ + ")")
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PYEOF

"$PY" -m pytest -m "not slow" "$@"
if [[ "${GPU_CHECK_BENCH:-1}" != "0" ]]; then
    "$PY" -m benchmarks.sdxl_throughput --device cuda --configs a b c --steps 160 --repeats 3
fi
