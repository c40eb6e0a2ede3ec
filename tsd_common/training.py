"""The plumbing both trainers share, in the order a run uses it.

- :func:`start_training`: the ``Accelerator`` (mixed precision, gradient accumulation, trackers, a seeded sampler
  identical on every process), the launch checks, and the checkpoint to resume from, resolved before any model
  loads (a wrong path or a corrupt RNG state fails here; ``--overwrite_output_dir`` deletes an earlier run's);
- :func:`register_adapter_hooks`: ``accelerator.save_state`` writes each adapter's native state (never the frozen
  base) and the trainer's own state; ``load_state`` loads no model weights (the adapters are restored by
  ``shared.load`` before ``prepare``);
- :func:`init_trackers`: the trackers get the run's scalar settings as hyperparameters;
- :func:`check_switch_agrees`: every process selected the same dash directions;
- :func:`write_loss_log` / :func:`read_loss_log`: ``loss_log.csv``, one row per optimizer step, written atomically;
- :func:`write_tsd_report`: ``tsd_report.csv`` and its plot.

Nothing here imports accelerate at module level, so the command-line modules stay cheap to import.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import shared
from shared.io import atomic_write_json, atomic_write_text

from .checkpoints import resolve_resume
from .launch import check_launch

LOSS_LOG = "loss_log.csv"
TRAINER_STATE = "trainer_state.json"
logger = logging.getLogger(__name__)


def start_training(*, output_dir: Path, logging_dir: str, report_to: str, mixed_precision: str | None,
                   gradient_accumulation_steps: int, resume_from: str | None, overwrite: bool,
                   checkpoint_marker: str, data_seed: int | None = None,
                   check: Callable[[Any], None] | None = None) -> tuple[Any, Path | None]:
    """The run's ``Accelerator`` and the checkpoint it resumes from (None for a new run).

    ``logging_dir`` is relative to ``output_dir``; ``report_to`` is accelerate's ``log_with`` (``none``: no
    tracker); ``data_seed`` seeds the shuffle of the seedable sampler (None: accelerate's default). ``check``
    runs further checks on the accelerator after the launch checks and before the resume is resolved, which
    may delete an earlier run's checkpoints (:func:`tsd_common.checkpoints.resolve_resume`, which also names
    ``checkpoint_marker``, the sub-directory every checkpoint of the trainer has).
    """
    from accelerate import Accelerator
    from accelerate import utils as accelerate_utils

    output_dir = Path(output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=accelerate_utils.ProjectConfiguration(project_dir=str(output_dir),
                                                             logging_dir=str(output_dir / logging_dir)),
        # the Trainer's sampler: a seeded shuffle, identical on every process (then sharded)
        dataloader_config=accelerate_utils.DataLoaderConfiguration(use_seedable_sampler=True, data_seed=data_seed),
    )
    check_launch(accelerator)
    if check is not None:
        check(accelerator)
    resume_dir = resolve_resume(accelerator, resume_from, output_dir, marker=checkpoint_marker, overwrite=overwrite)
    return accelerator, resume_dir


def register_adapter_hooks(accelerator: Any, adapters: Mapping[str, shared.Adapter],
                           trainer_state: Mapping[str, Any] | None = None,
                           save_extra: Callable[[Path], None] | None = None) -> None:
    """Make ``accelerator.save_state``/``load_state`` handle adapters instead of whole models.

    Saving writes ``<checkpoint>/<name>/`` with each adapter's native state (``shared.export_lora(...,
    format="tsd")``), when given ``trainer_state`` (read when the checkpoint is written) as
    ``trainer_state.json`` and whatever ``save_extra(checkpoint_dir)`` writes (e.g. an EMA's state), from the
    main process; the model weights accelerate would save, the frozen base included, are dropped. Loading
    restores no model (the adapters were restored by ``shared.load`` before ``prepare``); accelerate still
    restores the optimizer, scheduler, sampler and RNG states.
    """

    def save_hook(models: list, weights: list, checkpoint: str) -> None:
        if accelerator.is_main_process:
            for name, adapter in adapters.items():
                shared.export_lora(adapter, Path(checkpoint) / name, format="tsd")
            if trainer_state is not None:
                atomic_write_json(Path(checkpoint) / TRAINER_STATE, trainer_state)
            if save_extra is not None:
                save_extra(Path(checkpoint))
        weights.clear()

    def load_hook(models: list, checkpoint: str) -> None:
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The ``trainer_state`` a checkpoint was saved with (:func:`register_adapter_hooks`)."""
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


def init_trackers(accelerator: Any, project: str, settings: Mapping[str, Any]) -> None:
    """Start the trackers (main process) with the scalar ``settings`` as hyperparameters (trackers refuse
    lists, mappings and None)."""
    accelerator.init_trackers(project, config={k: v for k, v in settings.items()
                                               if isinstance(v, (int, float, str, bool))})


def check_switch_agrees(accelerator: Any, adapter: shared.Adapter) -> dict[str, Any]:
    """Gather a fingerprint of the dash directions selected on every process; raise if any differs.

    Returns the record of the switch: its step, the number of processes and every process's fingerprint (the
    sum of the selected indices and of the singular vectors, in float64).
    """
    dash = [adapter.dash_term(name) for name in adapter.dash_layers]
    fingerprint = torch.stack([
        torch.cat([d.indices.double() for d in dash]).sum(),
        sum(d.U.double().sum() + d.Vh.double().sum() for d in dash),
    ]).to(accelerator.device)
    every = accelerator.gather(fingerprint.unsqueeze(0)).cpu()
    if not torch.equal(every, every[:1].expand_as(every)):
        raise RuntimeError(f"the dash switch selected different directions on different processes: {every.tolist()}")
    return {"step": adapter.num_steps, "processes": accelerator.num_processes, "fingerprints": every.tolist()}


def write_loss_log(output_dir: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write ``output_dir/loss_log.csv`` atomically: a header of ``columns``, then a row per optimizer step."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(output_dir) / LOSS_LOG, buf.getvalue())


def read_loss_log(output_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``output_dir/loss_log.csv`` (none when it does not exist), each cell back to what was written:
    an int, a float, a bool, None for an empty cell, else the string."""
    path = Path(output_dir) / LOSS_LOG
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _cell(text: str) -> Any:
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def write_tsd_report(adapter: shared.Adapter, output_dir: Path, plot: bool = True) -> None:
    """``tsd_report.csv`` (per-layer σ, Δσ, change rates and the selected directions, ``shared.tsd.report``) and,
    with ``plot`` and matplotlib installed, ``tsd_report.png``."""
    rows = shared.tsd.report(adapter)
    shared.tsd.write_report_csv(rows, str(Path(output_dir) / "tsd_report.csv"))
    if plot:
        try:
            shared.tsd.plot_change_rates(rows, str(Path(output_dir) / "tsd_report.png"))
        except ImportError:
            logger.warning("matplotlib is not installed: tsd_report.png skipped (tsd_report.csv has the numbers)")
