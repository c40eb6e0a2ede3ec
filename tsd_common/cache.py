"""The user cache of tsd-lora, and the one way anything is built into it: completely, or not at all.

Cache dir: ``$TSD_CACHE``, else ``$XDG_CACHE_HOME/tsd-lora``, else ``~/.cache/tsd-lora``. It holds the fetched
assets (:mod:`tsd_common.assets`), the materialized tiny SDXL and the mini SDXL's replay prior as PNGs; nothing in
it is needed by the default run that the package does not also ship.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

DONE = "done"  # marker file inside every complete cache dir


def cache_dir() -> Path:
    """``$TSD_CACHE``, else ``$XDG_CACHE_HOME/tsd-lora``, else ``~/.cache/tsd-lora`` (resolved, not created)."""
    env = os.environ.get("TSD_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "tsd-lora").resolve()


def is_complete(directory: Path) -> bool:
    """Whether ``directory`` was built completely by :func:`build_cached_dir`."""
    return (Path(directory) / DONE).is_file()


def build_cached_dir(final: Path, build: Callable[[Path, Path], dict[str, Any] | None], marker: dict[str, Any],
                     *, force: bool = False) -> Path:
    """Return ``final``, building it first unless it is complete (or ``force``).

    ``build(out, scratch)`` fills ``out`` (``scratch`` is for downloads and other leftovers, deleted afterwards) and
    may return more fields for the ``done`` marker. Both are in a temp dir next to ``final``, which replaces
    ``final`` only when the build finished, so ``final`` is either complete or absent. A per-dir file lock
    serialises concurrent builders, and leftovers of an interrupted build are removed under it.
    """
    from filelock import FileLock  # a dependency of torch and huggingface_hub

    final = Path(final)
    if not force and is_complete(final):
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{final.name}.lock"):
        if not force and is_complete(final):  # another process built it while we waited
            return final
        for stale in root.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            out, scratch = tmp / "out", tmp / "scratch"
            out.mkdir()
            scratch.mkdir()
            extra = build(out, scratch) or {}
            (out / DONE).write_text(json.dumps({**marker, **extra}, indent=1) + "\n")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(out, 0o777 & ~umask)  # mkdtemp made its parent 0700; give the dir the usual mode
            if final.exists():  # an earlier build (force) or an incomplete dir: swap it out, then delete it
                os.replace(final, tmp / "old")
            os.replace(out, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
