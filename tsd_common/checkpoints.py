"""Training checkpoints of the trainers: ``<output_dir>/checkpoint-<step>`` directories written by
``accelerator.save_state`` (the adapters' native state through the trainers' save hooks, the optimizer, the
scheduler and the RNG states), written atomically, pruned only after a new one is complete, and checked before a
resume loads anything."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from shared.errors import InputError


def list_checkpoints(output_dir: Path) -> list[Path]:
    """``output_dir/checkpoint-<step>`` directories, oldest first (partial ones are never listed)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(accelerator: Any, resume_from: str | None, output_dir: Path, marker: str,
                   overwrite: bool = False) -> Path | None:
    """The checkpoint to resume from: a directory, ``"latest"`` (None when there is none yet) or None.

    Everything is checked before any model loads:

    - ``marker`` is a sub-directory every checkpoint of the calling trainer has (a wrong path fails here);
    - the checkpoint's RNG state must load (:func:`check_rng_state`), or the resume would not be exact;
    - a new run (``resume_from`` None) into an ``output_dir`` that holds checkpoints of an earlier run is refused
      unless ``overwrite`` (``--overwrite_output_dir``), which deletes them: the new run would replace and prune
      them, and a later ``latest`` could resume the earlier run's newest one.
    """
    output_dir = Path(output_dir)
    if not resume_from:
        earlier = list_checkpoints(output_dir)
        if earlier and not overwrite:
            names = ", ".join(p.name for p in earlier[-3:])
            raise InputError(f"--output_dir {output_dir} holds checkpoints of an earlier run ({names}): continue it "
                             "with --resume_from_checkpoint latest, start over with --overwrite_output_dir (deletes "
                             "them), or pick another --output_dir")
        if earlier:
            accelerator.wait_for_everyone()  # every process has listed them before they go
            if accelerator.is_main_process:
                for path in earlier:
                    shutil.rmtree(path)
            accelerator.wait_for_everyone()
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            accelerator.print(f"no checkpoint in {output_dir}; starting a new run")
            return None
        path = found[-1]
    else:
        path = Path(resume_from)
        if not (path / marker).is_dir():
            raise InputError(f"--resume_from_checkpoint {path} is not a checkpoint of this trainer (no {marker}/ "
                             "inside)")
    check_rng_state(path, accelerator.process_index)
    return path


def check_rng_state(checkpoint: Path, process_index: int) -> None:
    """Raise unless ``checkpoint``'s RNG state for this process loads (with torch's weights-only unpickler).

    ``accelerator.load_state`` logs "Could not load random states" at INFO level and goes on when that file is
    corrupt or refused, and the resumed run then silently differs from the uninterrupted one. A missing file only
    warns, as the Trainer does: a run resumed on more processes than it was saved from has none for the new ones.
    """
    from accelerate.utils import load

    path = Path(checkpoint) / f"random_states_{process_index}.pkl"
    if not path.is_file():
        warnings.warn(f"{path} does not exist (was the run saved from fewer processes?): this process's RNG starts "
                      "afresh, so the resumed run will not repeat the interrupted one exactly", stacklevel=2)
        return
    try:
        states = load(path)
        missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(states)
    except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
        raise InputError(f"{path}: cannot restore the RNG state ({type(err).__name__}: {err}); a resume from "
                         f"{checkpoint} would not continue the interrupted run exactly") from err
    if missing:
        raise InputError(f"{path}: the RNG state lacks {sorted(missing)}; a resume from {checkpoint} would not "
                         "continue the interrupted run exactly")


def save_training_checkpoint(accelerator: Any, output_dir: Path, step: int, limit: int | None) -> Path:
    """``accelerator.save_state`` into a temp dir, renamed when complete; only then prune old checkpoints.

    A run killed while saving leaves the previous checkpoints intact and ``latest`` never picks the
    partial one.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if limit is not None:
            for old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
