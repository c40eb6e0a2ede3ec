"""Shared by the benchmarks: what a result was measured on, and how it is written."""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine_info(*packages: str) -> dict[str, Any]:
    """Date, Python, platform, CPU counts, load average, torch threads, the GPU (if any) and the versions of
    ``packages``."""
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
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda,
            "versions": {p: importlib.import_module(p).__version__ for p in ("torch", *packages)}}


def write_result(result: dict[str, Any], out: Path, markdown: Callable[[dict[str, Any]], str], t_start: float) -> None:
    """Add the wall time and the markdown table to ``result``, write it as JSON to ``out`` and print the table."""
    import time

    from shared.io import atomic_write_text

    result["wall_s"] = time.perf_counter() - t_start
    result["markdown"] = table = markdown(result)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print()
    print(table)
    print(f"\nwrote {out} ({result['wall_s']:.0f} s)")


def mean_std(values: list[float | None], digits: int = 3, significant: bool = False) -> str:
    """"mean ± std" (sample std) to ``digits`` decimals (``significant``: significant digits, for values spanning
    magnitudes) over the values that are not None; one value alone, "–" if none."""
    import statistics

    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if significant:
        mean = f"{statistics.mean(values):.{digits}g}"
        return f"{mean} ± {statistics.stdev(values):.{digits}g}" if len(values) > 1 else mean
    mean = f"{round(statistics.mean(values), digits) + 0.0:.{digits}f}"  # + 0.0 turns a rounded -0.0 into 0.0
    return f"{mean} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else mean
