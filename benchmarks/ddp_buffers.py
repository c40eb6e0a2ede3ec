"""What DDP broadcasts every forward for a LoRA-Dash model after the switch, and what a 2-process step costs.

    python -m benchmarks.ddp_buffers [--layers 8] [--width 1024] [--steps 200] [--out FILE.json]

DDP (``broadcast_buffers=True``, its default) broadcasts every registered buffer of the wrapped module from rank 0
at the start of every forward. The model is ``--layers`` square Linear layers of ``--width`` (k = width singular
values each) with ReLU, dash on every layer (r = s = 8, switch after 2 steps). Two gloo/CPU processes
(``torch.multiprocessing``, one thread each) train it on their own data with AdamW; rank 0 reports the elements DDP
broadcasts per forward (``ddp.modules_buffers``) and the median wall time of a full step (forward, backward with
the gradient all-reduce, optimizer step) over ``--steps`` steps after the switch. Run it with another checkout first
on ``PYTHONPATH`` to time that one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def _worker(rank: int, args: argparse.Namespace, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    import shared

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU()) for _ in range(args.layers)])
    config = shared.AdapterConfig(method="dash", r=8, alpha=16, target_modules=[f"{i}.0" for i in range(args.layers)],
                                  dash_warmup_steps=2, dash_directions=8)
    adapter = shared.attach(model, config)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(16, args.width, generator=g), torch.randn(16, args.width, generator=g)
    times = []
    for step in range(args.steps + 5):
        start = time.perf_counter()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad()
        adapter.step(opt)
        if step >= 5:  # after the switch and Adam's first λ step
            times.append(time.perf_counter() - start)
    assert adapter.switched
    if rank == 0:
        buffers = ddp.modules_buffers
        Path(result_file).write_text(json.dumps({
            "layers": args.layers, "width": args.width, "steps": args.steps,
            "broadcast_buffers": len(buffers), "broadcast_elements": sum(b.numel() for b in buffers),
            "median_step_ms": 1e3 * statistics.median(times),
            "p10_p90_step_ms": [1e3 * statistics.quantiles(times, n=10)[i] for i in (0, -1)],
        }))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        torch.multiprocessing.spawn(_worker, args=(args, os.path.join(tmp, "init"), result), nprocs=2)
        out = json.loads(Path(result).read_text())
    import shared

    out["shared"] = str(Path(shared.__file__).parent)  # which checkout was timed
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
