"""The singular bases the dash switch projects onto, computed away from the switch step.

At the switch (``docs/methods.md#lora-dash``) every dash layer needs the thin SVD W = U Σ Vᵀ of its original weight
(:meth:`shared.Adapter.original_weight`, fp32). The selection itself is cheap: Δσ = rowsum((UᵀP) ⊙ (QV)ᵀ) for the
update ΔW = P Q, δ = |Δσ| / (σ + eps), top-s, fill. The SVDs do not depend on training, so :class:`SwitchBases`
can compute them before the switch (``AdapterConfig.dash_svd``):

- ``"background"`` (default): in a thread started at the first optimizer step, while the warm-up steps train. On
  CPU the thread runs in the idle scheduling class (Linux ``SCHED_IDLE``: it gets the cycles training leaves); on
  CUDA it works on a side stream. If it is not done at the switch, the switch waits for the rest.
- ``"upfront"``: at once, in the calling thread (the first optimizer step, or :meth:`shared.Adapter.prepare_switch`).
- ``"switch"``: at the switch, as the reference does.

**Bit for bit.** The SVDs are the batched calls of :func:`shared.tsd.iter_svd` (same chunks, kernels, device and
thread count), and U, Σ, Vᵀ are read back with the memory layout the SVD gave them, so the switch selects exactly
what it would select computing them itself. What the bits depend on besides the weights, the *compute signature*
(:func:`compute_signature`: torch version, device and its model, thread count), and the identity and in-place
version of every tensor the weights are read from are recorded when the SVDs start; if either differs at the
switch, the switch computes the SVDs itself.

**Memory.** One batched call (at most ``tsd.SVD_BATCH_BYTES`` of weights) at a time. Each call's U, Σ, Vᵀ go to a
safetensors file, in the cache directory or in a private temporary one removed after the switch, and the switch
reads them back one file at a time.

**Cache** (``AdapterConfig.dash_svd_cache_dir``): one file per batched call, named by the sha256 of the format, the
compute signature, the stack's shape and its fp32 bytes, so a file of other weights is never looked up. Its header
repeats that key and holds the sha256 of its data. A file is used only when both check out and its tensors have
the expected names, shapes and dtype; otherwise it is rebuilt, with a warning. At the switch a file that changed
on disk since it was checked (inode, size, mtime) is checked again.

**Several processes.** Under DDP the batched calls are shared out among the ranks (largest first, each to the
least loaded rank); each rank computes its own and selects on its own layers, and every layer's record (U_I, V_Iᵀ,
I, σ, Δσ, energy) is then broadcast from the rank that computed it, so the SVDs take about 1/N of the time and
every rank ends with the same bytes. Under FSDP2 reading a weight is a collective, so every rank reads every weight
and computes every SVD (at the switch, or up front), and the records come from rank 0.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import platform
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import tsd
from .io import save_safetensors

Tensor = torch.Tensor
#: when the switch's SVDs run (``AdapterConfig.dash_svd``)
SCHEDULES = ("background", "upfront", "switch")
FORMAT_VERSION = "1"
#: a layer's selection record: U_I (n × s), V_Iᵀ (s × m), I (s), σ (k), Δσ (k), energy shares (2)
Record = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_RUNNING: weakref.WeakSet = weakref.WeakSet()  # bases whose background thread still runs (closed or not)
#: at exit, how long to wait for a background thread to finish its batched call (a thread left inside a LAPACK or
#: CUDA call while the interpreter shuts down can crash the exit)
EXIT_WAIT_S = 120.0


def compute_signature(device: torch.device) -> str:
    """What the bits of an SVD depend on besides its input: torch version, device and its model, thread count."""
    if device.type == "cuda":
        where = f"cuda {torch.version.cuda} {torch.cuda.get_device_name(device)}"
    else:
        where = (f"{device.type} {torch.backends.cpu.get_cpu_capability()} {_cpu_model()} "
                 f"threads {torch.get_num_threads()}")
    return f"torch {torch.__version__}; {platform.machine()}; {where}"


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def share_out(costs: Sequence[float], world: int) -> list[int]:
    """The rank of each job: the largest job first, each to the least loaded rank (the lowest on ties). Depends only
    on ``costs`` and ``world``, so every rank computes the same assignment."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner


def svd_cost(shape: Sequence[int]) -> float:
    """Relative cost of a thin SVD of an n × m matrix: n m min(n, m)."""
    n, m = shape[-2:]
    return float(n * m * min(n, m))


@dataclass
class _Entry:
    """A checked file of one batched call: where it is, what it was when checked, its key, the stack's shape."""

    path: Path
    stat: tuple[int, int, int]
    key: str
    shape: tuple[int, int, int]  # of the weight stack


class SwitchBases:
    """U, Σ, Vᵀ of the original weights of some dash layers, for one switch.

    ``weight_of(name)`` gives the fp32 original W (out × in), ``shape_of(name)`` its shape and ``state_of(name)`` the
    identity and version of the tensors it is read from (see the module docstring for what is checked when).
    ``collective``: reading a weight is a collective (FSDP2), so every rank reads and computes everything, in order.

    A background thread takes the batched calls one by one. The switch never waits for it: it reads the files of
    the calls finished, computes those not started itself and, last, those the thread is still on, unless it finished
    them meanwhile (a thread in the idle class may wait long for a core). Call :meth:`wait` to block until it is done.
    """

    def __init__(self, names: Sequence[str], weight_of: Callable[[str], Tensor], shape_of: Callable[[str], tuple],
                 state_of: Callable[[str], Any], device: torch.device, *, cache_dir: str | os.PathLike | None = None,
                 collective: bool = False) -> None:
        self.names = sorted(names)
        self.weight_of, self.state_of, self.device = weight_of, state_of, torch.device(device)
        self.chunks = tsd.svd_chunks(self.names, shape_of)
        self.rank, self.world = _rank_and_world()
        self.collective = collective
        self.owner = ([0] * len(self.chunks) if collective else
                      share_out([sum(svd_cost(shape_of(n)) for n in c) for c in self.chunks], self.world))
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.cache_hits = self.cache_rebuilt = 0
        self._signature: str | None = None  # of the SVDs in the files
        self._state: list[Any] | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._lock = threading.Lock()  # guards the four fields below, shared with the background thread
        self._claimed: set[int] = set()  # chunks started
        self._entries: dict[int, _Entry] = {}  # chunks finished
        self._thread_done = True
        self._closed = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()

    def computes(self, i: int) -> bool:
        """Whether this rank computes (or reads) the SVDs of chunk ``i``."""
        return self.collective or self.owner[i] == self.rank

    @property
    def files(self) -> list[Path]:
        """The files of the batched calls finished so far (their number is the progress of a background thread)."""
        with self._lock:
            return [entry.path for entry in self._entries.values()]

    @property
    def directory(self) -> Path | None:
        """Where the files go: the cache directory, or the temporary one (None before :meth:`start`)."""
        return self.cache_dir if self._tmp is None else Path(self._tmp.name)

    # ------------------------------------------------------------------ before the switch
    def start(self, background: bool) -> None:
        """Compute (or read from the cache) this rank's SVDs into files: in a background thread, or here."""
        if background and self.collective:
            raise ValueError("reading the weights is a collective here (FSDP2): it cannot run in a background thread")
        self._signature = compute_signature(self.device)
        self._state = [self.state_of(n) for n in self.names]
        if self.cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tsd-switch-svd-", ignore_cleanup_errors=True)
        if not background:
            with torch.no_grad():
                self._prepare()
            return
        self._thread_done = False
        self._thread = threading.Thread(target=self._run, name="tsd-switch-svd", daemon=True)
        _RUNNING.add(self)
        self._thread.start()

    def wait(self) -> None:
        """Block until the background thread has finished (or stopped)."""
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            lower_thread_priority(self.device)
            with torch.no_grad(), _side_stream(self.device):
                self._prepare()
        except BaseException as err:  # reported at the switch, which computes what is missing
            self._error = err
        finally:
            with self._lock:
                self._thread_done, clean = True, self._closed
            _RUNNING.discard(self)
            if clean:
                self._remove_tmp()

    def _prepare(self) -> None:
        while (i := self._claim()) is not None:
            entry = self._store(i, self._stack(self.chunks[i]), self._signature)
            if entry is None:
                return  # the thread count changed meanwhile: the switch computes everything itself
            with self._lock:
                self._entries[i] = entry

    def _claim(self) -> int | None:
        """The next chunk of this rank nobody started (marked started), or None."""
        with self._lock:
            for i in range(len(self.chunks)):
                if self.computes(i) and i not in self._claimed and not self._stop.is_set():
                    self._claimed.add(i)
                    return i
        return None

    def _stack(self, chunk: Sequence[str]) -> Tensor:
        return tsd.stack_weights(chunk, self.weight_of)

    def _store(self, i: int, stack: Tensor, signature: str) -> _Entry | None:
        """Chunk ``i``'s file: found in the cache, or computed and written; None (nothing written) if the compute
        signature is no longer ``signature`` after the SVD."""
        key = self._key(stack, signature) if self.cache_dir is not None else ""
        shape = tuple(stack.shape)
        if key and self._cached(key, shape) is not None:
            path = self._cache_path(key)
            return _Entry(path, _stat(path), key, shape)
        bases = tsd.batched_svd(stack)
        if compute_signature(self.device) != signature:
            return None
        path = self._cache_path(key) if key else Path(self._tmp.name) / f"chunk{i}.safetensors"
        _write(path, key, bases)
        return _Entry(path, _stat(path), key, shape)

    def _key(self, stack: Tensor, signature: str) -> str:
        h = hashlib.sha256(json.dumps({"format": FORMAT_VERSION, "signature": signature,
                                       "shape": list(stack.shape)}).encode())
        h.update(_buffer(stack))
        return h.hexdigest()

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / f"switch-svd-{key}.safetensors"

    def _cached(self, key: str, shape: Sequence[int]) -> tuple[Tensor, Tensor, Tensor] | None:
        """The checked bases of the cache file of ``key``; None when there is none or it fails (it is then rebuilt)."""
        path = self._cache_path(key)
        if not path.exists():
            return None
        bases = _read_checked(path, key, shape)
        with self._lock:
            if bases is None:
                self.cache_rebuilt += 1
            else:
                self.cache_hits += 1
        if bases is None:
            warnings.warn(f"dash switch SVD cache file {path} is corrupt, partial or not of these weights; rebuilding "
                          "it", stacklevel=2)
        return bases

    # ------------------------------------------------------------------ at the switch
    def owned(self) -> Iterator[tuple[str, Tensor, Tensor, Tensor]]:
        """``(name, U, S, Vh)`` of every layer this rank computes, one batched call at a time, on the weights' device:
        read from the files finished, else (schedule "switch", not finished, stale or failed) computed now."""
        self._stop.set()  # a background thread takes no new chunk
        current = compute_signature(self.device)
        fresh = self._signature == current and self._state == [self.state_of(n) for n in self.names]
        if self.collective:  # every rank must read the weights of the same chunks (a collective): all or none
            fresh = _on_every_rank(fresh and all(_unchanged(e) for e in self._entries.values()), self.device)
        with self._lock:
            started = set(self._claimed) - set(self._entries)
        if self._error is not None:
            warnings.warn(f"the dash switch's background SVDs stopped ({self._error!r}); the switch computes the rest",
                          stacklevel=3)
        mine = [i for i in range(len(self.chunks)) if self.computes(i)]
        if not self.collective:  # the chunks a background thread is still on go last: it may finish them meanwhile
            mine = [i for i in mine if i not in started] + [i for i in mine if i in started]
        for i in mine:
            with self._lock:
                entry = self._entries.get(i) if fresh else None
            bases = None if entry is None else _read(entry)
            if entry is not None and bases is None:
                warnings.warn(f"dash switch SVD file {entry.path} changed since it was written or checked and fails "
                              "its check now; computing its SVDs at the switch", stacklevel=2)
            if bases is None:
                bases = self._compute_now(self.chunks[i], current)
            U, S, Vh = (t.to(self.device) for t in bases)
            for j, name in enumerate(self.chunks[i]):
                yield name, U[j], S[j], Vh[j]

    def _compute_now(self, chunk: Sequence[str], signature: str) -> tuple[Tensor, Tensor, Tensor]:
        """The SVDs of a chunk at the switch: from the cache when it has them, else computed (and cached)."""
        stack = self._stack(chunk)
        key = self._key(stack, signature) if self.cache_dir is not None else ""
        bases = self._cached(key, stack.shape) if key else None
        if bases is None:
            bases = tsd.batched_svd(stack)
            if key:
                _write(self._cache_path(key), key, bases)
        return bases

    def share(self, records: dict[str, Record], shapes: dict[str, tuple[int, int]], s: int) -> dict[str, Record]:
        """Every layer's record on every rank: each rank broadcasts those of the layers it computed (one packed fp64
        buffer per rank; fp32 values and indices round-trip exactly). Records received are padded to s slots."""
        if self.world == 1:
            return records
        dist = torch.distributed
        out = dict(records)
        for rank in range(self.world):
            names = [n for i, c in enumerate(self.chunks) if self.owner[i] == rank for n in c]
            if not names:
                continue
            sizes = [_record_sizes(shapes[n], s) for n in names]
            if rank == self.rank:
                buf = torch.cat([_pack(records[n], s) for n in names])
            else:
                buf = torch.empty(sum(map(sum, sizes)), dtype=torch.float64, device=self.device)
            dist.broadcast(buf, src=rank)
            if rank != self.rank:
                for name, parts in zip(names, buf.split([sum(z) for z in sizes]), strict=True):
                    out[name] = _unpack(parts, shapes[name], s)
        return out

    def close(self) -> None:
        """Stop the background thread after its current batched call, and remove the temporary files (now, or when
        the thread ends). Does not wait for the thread."""
        self._stop.set()
        with self._lock:
            self._closed, clean = True, self._thread_done
        if clean:
            self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


# ---------------------------------------------------------------------------------------------- files
def _buffer(t: Tensor) -> memoryview:
    """The bytes of a tensor (moved to CPU, contiguous), for hashing."""
    return memoryview(t.detach().cpu().contiguous().numpy()).cast("B")


def _stat(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _layout(t: Tensor) -> list[int]:
    """The dimension order of ``t`` in memory (outermost first): ``t.permute(order)`` is contiguous."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def _write(path: Path, key: str, bases: tuple[Tensor, Tensor, Tensor]) -> None:
    """Write U, S, Vh in their memory order (LAPACK's U and Vh are column-major per matrix) with the permutation that
    restores their layout, the key and the sha256 of the data, atomically."""
    stored, layouts = {}, {}
    for name, t in zip(("U", "S", "Vh"), bases, strict=True):
        layouts[name] = _layout(t)
        stored[name] = t.detach().permute(layouts[name]).contiguous().cpu()
    meta = {"tsd_switch_svd": FORMAT_VERSION, "key": key, "layouts": json.dumps(layouts),
            "data_sha256": _data_sha(stored)}
    save_safetensors(stored, path, metadata=meta)


def _data_sha(stored: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in ("U", "S", "Vh"):
        h.update(_buffer(stored[name]))
    return h.hexdigest()


def _load(path: Path) -> tuple[dict[str, str], dict[str, Tensor]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # safetensors raises its own error types for truncated or malformed files
        return None


def _restore(meta: dict[str, str], stored: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:
    """U, S, Vh in their original layout, in fresh (allocator-aligned) memory; None if the layouts are unreadable."""
    try:
        layouts = json.loads(meta["layouts"])
        out = []
        for name in ("U", "S", "Vh"):
            order = layouts[name]
            out.append(stored[name].clone().permute(sorted(range(len(order)), key=order.__getitem__)))
        return out[0], out[1], out[2]
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None


def _unchanged(entry: _Entry) -> bool:
    try:
        return _stat(entry.path) == entry.stat
    except OSError:
        return False


def _read(entry: _Entry) -> tuple[Tensor, Tensor, Tensor] | None:
    """An entry's bases; checked again (key, data hash) if the file changed on disk since it was checked."""
    if not _unchanged(entry):
        return _read_checked(entry.path, entry.key, entry.shape)
    loaded = _load(entry.path)
    return None if loaded is None else _restore(*loaded)


def _read_checked(path: Path, key: str, shape: Sequence[int]) -> tuple[Tensor, Tensor, Tensor] | None:
    """The bases in ``path`` if its format, key, dtypes, data hash and shapes (for a stack of ``shape``) are right;
    None otherwise."""
    loaded = _load(path)
    if loaded is None:
        return None
    meta, stored = loaded
    if (meta.get("tsd_switch_svd") != FORMAT_VERSION or meta.get("key") != key or set(stored) != {"U", "S", "Vh"}
            or any(t.dtype != torch.float32 for t in stored.values()) or meta.get("data_sha256") != _data_sha(stored)):
        return None
    bases = _restore(meta, stored)
    b, n, m = shape
    k = min(n, m)
    if bases is None or [tuple(t.shape) for t in bases] != [(b, n, k), (b, k), (b, k, m)]:
        return None
    return bases


# ---------------------------------------------------------------------------------------------- records
def _record_sizes(shape: tuple[int, int], s: int) -> list[int]:
    n, m = shape
    k = min(n, m)
    return [n * s, s * m, s, k, k, 2]


def _pack(record: Record, s: int) -> Tensor:
    """A record as one fp64 vector, the directions padded to s slots (zero columns / rows, index -1)."""
    U_I, Vh_I, idx, S, ds, energy = record
    U = U_I.new_zeros(U_I.shape[0], s)
    Vh = Vh_I.new_zeros(s, Vh_I.shape[1])
    padded = torch.full((s,), -1, dtype=torch.long, device=idx.device)
    U[:, : idx.numel()], Vh[: idx.numel()], padded[: idx.numel()] = U_I, Vh_I, idx
    device = U.device
    return torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in (U, Vh, padded, S, ds, energy)])


def _unpack(buf: Tensor, shape: tuple[int, int], s: int) -> Record:
    n, m = shape
    U, Vh, idx, S, ds, energy = buf.split(_record_sizes(shape, s))
    return (U.float().reshape(n, s), Vh.float().reshape(s, m), idx.long(), S.float(), ds.float(),
            energy.float().cpu())


# ---------------------------------------------------------------------------------------------- threads
def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _on_every_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on every rank (an all-reduce)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def lower_thread_priority(device: torch.device) -> None:
    """On CPU, put the calling thread (and the OpenMP/MKL threads it starts) in the idle scheduling class."""
    if device.type != "cpu":
        return
    with contextlib.suppress(AttributeError, OSError):  # not Linux: the thread keeps the normal priority
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


@contextlib.contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """On CUDA, run the block on a stream of its own that starts after the work queued so far."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.default_stream())
        with torch.cuda.stream(stream):
            yield


@atexit.register
def _stop_background() -> None:
    running = list(_RUNNING)
    for bases in running:
        bases.close()
    for bases in running:
        if bases._thread is not None:
            bases._thread.join(EXIT_WAIT_S)
