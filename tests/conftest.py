"""The test session's settings (offline hubs, at most two torch threads, deterministic CUDA kernels) and fixtures;
the helpers the tests share are in ``tests/helpers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import DEVICE, SHARED_DATA

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

if DEVICE.type == "cuda":
    # the equivalence tests (resume vs uninterrupted, export vs trained) compare to 1e-6 and expect run-to-run
    # repeatability, which CUDA gives only with deterministic kernels and without TF32 (scripts/gpu_check.sh)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for backend in ("flash", "mem_efficient", "cudnn"):  # their attention backward is not deterministic; math is
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent")
    return SHARED_DATA
