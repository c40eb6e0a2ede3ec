"""User errors at the command line: one clear line on stderr naming the problem, exit status 2, no traceback; the
same from `accelerate launch --quiet` (one process prints, not every layer of the launch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def _run(app: str, *args: str, launcher: bool = False, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TSD_CACHE=str(cwd / "cache"),
               PYTHONPATH=str(REPO))  # this checkout's packages, whatever the installed one is
    head = ([sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1", "--num_machines",
             "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if launcher else [sys.executable])
    return subprocess.run([*head, str(REPO / "apps" / app), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The message (from its ``error:`` line to the end of stderr): exactly one, with every needle in it."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, proc.stderr[-3000:]
    message = "\n".join(lines[starts[0]:])
    for needle in needles:
        assert needle in message, message
    return message


def test_sdxl_trainer_names_a_missing_instance_dir(tmp_path):
    proc = _run("train_sdxl.py", "--instance_data_dir", str(tmp_path / "nope"), "--instance_prompt", "a sks dog",
                "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    _one_error_line(proc, str(tmp_path / "nope"), "does not exist")


def test_sdxl_trainer_names_a_corrupt_photo(tmp_path):
    from tsd_diffusion.tiny import make_subject_images

    photos = tmp_path / "photos"
    make_subject_images(photos, n=2, size=64)
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    proc = _run("train_sdxl.py", "--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks teapot",
                "--pretrained_model_name_or_path", "tsd-lora/tiny-sdxl", "--output_dir", str(tmp_path / "out"),
                launcher=True, cwd=tmp_path)
    _one_error_line(proc, "broken.png")


@pytest.mark.parametrize("flags, needle", [
    (["--rank", "0"], "--rank must be > 0"),
    (["--resume_from_checkpoint", "nowhere"], "is not a checkpoint of this trainer"),
])
def test_sdxl_trainer_refuses_bad_flags(tmp_path, flags, needle):
    proc = _run("train_sdxl.py", "--output_dir", str(tmp_path / "out"), *flags, cwd=tmp_path)
    assert proc.returncode == 2
    _one_error_line(proc, needle)


def test_text_trainer_names_a_missing_data_file(tmp_path):
    proc = _run("train_text.py", "--model_name_or_path", str(tmp_path), "--task", "classification", "--train_file",
                str(tmp_path / "train.csv"), "--eval_split", "0.2", "--output_dir", str(tmp_path / "out"),
                launcher=True, cwd=tmp_path)
    _one_error_line(proc, "train.csv")


def test_a_bug_keeps_its_traceback():
    """Only InputError is turned into one line: anything else is a bug and must show where it happened."""
    from shared.errors import InputError
    from tsd_common.launch import run_cli

    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: (_ for _ in ()).throw(InputError("bad flag")))
    assert stop.value.code == 2
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 / 0)
