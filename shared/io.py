"""Safe file I/O: atomic writes and safetensors only (never pickle from user files)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PathLike = str | os.PathLike
#: the process umask, read once at import (setting and restoring it later could race with other threads)
UMASK = os.umask(0)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_target(path: PathLike) -> Iterator[str]:
    """A temporary file beside ``path`` to write; when the block ends without error it is fsynced and moved onto
    ``path`` with ``os.replace``, else removed.

    A crash leaves either the old file or the new one, never a partial file. The file gets the permissions
    a plain ``open(path, "w")`` would give (0666 minus the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_target`)."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(tensors: dict[str, torch.Tensor], path: PathLike, metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` (made contiguous, moved to CPU) as a safetensors file. safetensors writes the
    file itself, without a copy of it in memory and without holding the GIL."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_target(path) as tmp:
        save_file(clean, tmp, metadata=metadata)


def load_safetensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file, with an error naming the file when it is missing or not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def read_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
