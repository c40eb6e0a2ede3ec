"""Launch sanity checks and the command-line error boundary of the frontends (no accelerate import at module level)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.errors import InputError

CPU_LAUNCH_HINT = (
    "on CPU, launch several processes with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N "
    "--num_machines 1 --gpu_ids all ...` (in accelerate 1.x `accelerate launch --cpu --num_processes N` "
    "starts one process)"
)


SHARDING_HINT = (
    "launch with DDP (`accelerate launch --multi_gpu`) instead: a LoRA adapter and its optimizer state are small, "
    "and `--torch_dtype bfloat16` halves the replicated frozen base. The core (shared.attach, Adapter.switch, "
    "export_lora) does run under FSDP2 in a loop of your own (README, Distributed)"
)


def _refuse_parameter_sharding(accelerator: Any) -> None:
    kind = str(getattr(getattr(accelerator, "distributed_type", None), "value", ""))
    if kind == "FSDP":
        raise InputError("FSDP shards the parameters, which this trainer does not support: " + SHARDING_HINT)
    if kind == "DEEPSPEED":
        plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            raise InputError("DeepSpeed ZeRO stage 3 shards the parameters, which this trainer does not support "
                             "(stages 1 and 2 do not shard them); " + SHARDING_HINT)


def requested_processes(cmdline: list[str]) -> int | None:
    """The ``--num_processes`` value of an ``accelerate launch`` command line, or None."""
    for i, arg in enumerate(cmdline):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(cmdline) and cmdline[i + 1].isdigit():
                return int(cmdline[i + 1])
            if arg.startswith(flag + "=") and arg.split("=", 1)[1].isdigit():
                return int(arg.split("=", 1)[1])
    return None


def _parent_cmdline() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:  # not Linux, or not readable: nothing to check
        return []
    return raw.decode(errors="replace").split("\0")


def check_launch(accelerator: Any, parent_cmdline: list[str] | None = None) -> None:
    """Refuse to run when the launch does not give the processes that were asked for, or shards parameters.

    - a launcher started several processes that did not join one distributed run: they would each train
      alone and race on the same output directory;
    - ``accelerate launch --cpu --num_processes N`` (N > 1) started a single process (accelerate 1.x's CPU
      launcher does), which would silently train with 1/N of the requested batch;
    - FSDP or DeepSpeed ZeRO-3: the trainers save adapters and checkpoints from the main process alone, which
      needs whole parameters; refused here instead of failing at the first save, after the compute.
    """
    _refuse_parameter_sharding(accelerator)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise InputError(
            f"the launcher started {launched} processes but accelerate set up {accelerator.num_processes}; "
            + CPU_LAUNCH_HINT
        )
    if accelerator.num_processes == 1 and "WORLD_SIZE" not in os.environ:
        cmdline = _parent_cmdline() if parent_cmdline is None else parent_cmdline
        if any(Path(a).name == "accelerate" or a.endswith("accelerate.commands.launch") for a in cmdline[:3]):
            asked = requested_processes(cmdline)
            if asked and asked > 1:
                raise InputError(f"`accelerate launch --num_processes {asked}` started 1 process; " + CPU_LAUNCH_HINT)


def run_cli(main: Callable[[], Any]) -> Any:
    """Run a command-line entry point: an :class:`~shared.errors.InputError` becomes one line on stderr, printed
    by the main process only (every process validates the same input), and exit status 2; anything else keeps its
    traceback. Under ``accelerate launch`` add ``--quiet``, or the launcher wraps a failed process's exit in a
    traceback of its own."""
    try:
        return main()
    except InputError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
