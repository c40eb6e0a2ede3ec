"""The benchmark suites and measurements (``python -m benchmarks.run``, ``python -m benchmarks.<name>``): they load
models from local directories only, so the model hub is switched off before anything imports it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
