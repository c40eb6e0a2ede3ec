"""Worker for ``tests/core/test_ddp.py``'s pooled-statistics test, and its single-process reference.

Launched as ``torch.distributed.run --nproc_per_node 2 tests/core/ddp_pooled_worker.py --out DIR`` (gloo, CPU):
rank r reads its own K batches, the global batches r, r + N, r + 2N, ... of one seeded list (as the trainers
shard the init batches), attaches every data-driven method with per-process budgets, and computes the pooled
statistics themselves. ``run(out, world=1)`` is the reference: one process on the batches of all ranks, that is
the global list with N× the budget for the gradient statistics (their pooled mean sums over every batch) and, for
EVA, K batches each the concatenation of the ranks' batches of that step (its PCA step reads every rank's rows).
Each writes ``DIR/rank{r}.safetensors``: per method the adapter's factors and the statistics.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import shared
from shared.statistics import FisherGradient, collect, weight_gradients
from tests.helpers import lm_batches, tiny_llama

WORLD, K, B = 2, 3, 4  # processes, batches per process, samples per batch
TARGETS = ["q_proj", "v_proj", "down_proj"]
#: per-process budgets of K batches
METHODS = {"eva": dict(eva_max_batches=K, eva_rho=1.0),
           "lora_da": dict(lora_da_num_samples=K * B, lora_da_population=100),
           "lora_init": dict(lora_init_estimator="gradient", lora_init_steps=K),
           "lora_ga": dict(lora_ga_batches=K),
           "lora_init_warmup": dict(lora_init_estimator="warmup", lora_init_steps=K, lora_init_lr=1e-2)}


def global_batches() -> list[dict[str, torch.Tensor]]:
    return lm_batches(n=WORLD * K, batch_size=B, seq=12, seed=7)


def batches_of(method: str, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    every = global_batches()
    if world > 1:
        return every[rank::world]
    if method == "eva":
        return [{k: torch.cat([b[k] for b in every[i * WORLD:(i + 1) * WORLD]]) for k in every[0]} for i in range(K)]
    return every


def config(method: str, world: int, **kw) -> shared.AdapterConfig:
    """The per-process budgets; the single-process reference of a gradient method reads WORLD× the batches."""
    budget = dict(METHODS[method])
    if world == 1 and method != "eva":
        budget = {k: v * WORLD if k in ("lora_da_num_samples", "lora_init_steps", "lora_ga_batches") else v
                  for k, v in budget.items()}
    return shared.AdapterConfig(method=method.removesuffix("_warmup"), r=2, alpha=4, target_modules=TARGETS,
                                **budget, **kw)


def statistics(method: str, batches: list, cfg: shared.AdapterConfig) -> dict[str, torch.Tensor]:
    """The pooled statistics the init reads: the mean gradient, or LoRA-DA's G, Z and diag(Y)."""
    model = tiny_llama()
    layers = {n: model.get_submodule(n) for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
    if method in ("lora_init", "lora_ga"):
        steps = cfg.lora_init_steps if method == "lora_init" else cfg.lora_ga_batches
        return {f"{n}.G": g for n, g in weight_gradients(model, layers, batches, max_batches=steps,
                                                         progress=False).items()}
    if method == "lora_da":
        accs = {n: FisherGradient() for n in layers}
        collect(model, layers, accs, itertools.cycle(batches), max_batches=cfg.lora_da_num_samples // B,
                progress=False)
        return {f"{n}.{k}": t for n, a in accs.items() for k, t in (("G", a.grad), ("Z", a.z.value), ("y", a.y))}
    return {}


def run(out: Path, rank: int = 0, world: int = 1) -> dict:
    tensors: dict[str, torch.Tensor] = {}
    for method in METHODS:
        if world == 1 and method == "lora_init_warmup":
            continue  # pooled like DDP's mean gradient per step: checked for identical ranks only
        batches = batches_of(method, rank, world)
        cfg = config(method, world)
        adapter = shared.attach(tiny_llama(), cfg, data=batches, progress=False)
        for name in adapter.layers:
            B_, A_ = adapter.lora_factors(name)
            tensors[f"{method}.{name}.lora_A"], tensors[f"{method}.{name}.lora_B"] = A_, B_
        for key, t in statistics(method, batches, cfg).items():
            tensors[f"{method}.stat.{key}"] = t
    first = batches_of("lora_da", rank, world)[0]["input_ids"][0, :4]
    meta = {"rank": rank, "world_size": world, "first_tokens": first.tolist()}
    if world > 1:  # ranks whose models differ end with different inits: attach's fingerprint check must catch it
        try:
            shared.attach(tiny_llama(seed=rank), config("lora_init", world), data=batches_of("lora_init", rank, world),
                          progress=False)
            meta["mismatch"] = "not detected"
        except RuntimeError as e:
            meta["mismatch"] = str(e)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out / f"rank{rank}.safetensors"),
              metadata={"meta": json.dumps(meta)})
    return meta


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        run(args.out, torch.distributed.get_rank(), torch.distributed.get_world_size())
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
