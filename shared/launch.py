"""Launch sanity checks for the frontends (no accelerate import at module level)."""

from __future__ import annotations

import os
from typing import Any

CPU_LAUNCH_HINT = (
    "on CPU, launch several processes with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N "
    "--num_machines 1 --gpu_ids all ...` (in accelerate 1.x `accelerate launch --cpu --num_processes N` starts one process)"
)


def check_launch(accelerator: Any) -> None:
    """Refuse to run when a launcher started several processes that did not join one distributed run.

    They would each train alone and race on the same output directory.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but accelerate set up {accelerator.num_processes}; "
            + CPU_LAUNCH_HINT
        )
