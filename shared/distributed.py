"""The core's collectives under ``torch.distributed`` (DDP, ``docs/distributed.md#pooled-init-statistics``).

With one process, or without an initialised process group, every function here is the identity or a no-op, so
the core calls them unconditionally. Under DDP every rank calls them in the same order:

- :func:`all_reduce_sum` sums the streaming statistics of the gradient inits (LoRA-DA's G, Z and diag(Y), the
  gradient estimators), so N processes pool N× the batches;
- :func:`all_gather_rows` concatenates a layer's inputs of every rank in rank order (EVA's incremental PCA reads
  the rows of every rank's batch in one step, as peft's EVA all-gathers them);
- :func:`check_identical` gathers a fingerprint and raises when the ranks differ.

Tensors travel on the device the backend needs (the current CUDA device for NCCL, the CPU otherwise) and come
back where they were.
"""

from __future__ import annotations

import torch


def world_size() -> int:
    """Processes of the default group; 1 without one."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every tensor summed over the ranks (new tensors on the inputs' devices; the inputs unchanged)."""
    if world_size() == 1:
        return tensors
    device = _comm_device()
    out = []
    for t in tensors:
        buf = t.detach().to(device, copy=True)
        torch.distributed.all_reduce(buf)
        out.append(buf.to(t.device))
    return out


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows (dim 0) of ``x`` on every rank, concatenated in rank order; the row counts may differ by rank."""
    world = world_size()
    if world == 1:
        return x
    dist, device = torch.distributed, _comm_device()
    count = torch.tensor([x.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]), device=device)
    padded[: x.shape[0]] = x.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(x.device)


def check_identical(fingerprint: torch.Tensor, what: str) -> None:
    """Raise ``RuntimeError`` naming ``what`` unless every rank passed the bitwise same (float64) ``fingerprint``."""
    world = world_size()
    if world == 1:
        return
    mine = fingerprint.detach().to(_comm_device(), torch.float64).reshape(-1)
    every = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(every, mine)
    if not all(torch.equal(e, every[0]) for e in every):
        sums = [float(e.sum()) for e in every]
        raise RuntimeError(f"{what} differs across processes (fingerprint sums per rank: {sums}); every process must "
                           "pass the same model, config and seed")
