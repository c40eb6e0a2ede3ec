"""What a benchmark result was measured on: recorded next to every number."""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
from typing import Any


def machine_info(*packages: str) -> dict[str, Any]:
    """Date, Python, platform, CPU counts, load average, torch threads and the versions of ``packages``."""
    import torch

    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_count_physical": physical, "torch_threads": torch.get_num_threads(),
            "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "versions": {p: importlib.import_module(p).__version__ for p in ("torch", *packages)}}
