"""Worker for ``tests/test_ddp.py``: a real multi-process DDP (gloo, CPU) LoRA-Dash run through accelerate.

Launched by the test as ``accelerate launch --multi_gpu --num_processes 2 ... tests/ddp_dash_worker.py --out DIR``
with ``ACCELERATE_USE_CPU=true`` (see the test for why not ``--cpu``). Every rank builds the same seeded tiny
LLaMA, attaches dash (t=3, s=2, r=4), trains on its *own* data with gradient accumulation 2 and calls
``adapter.step`` only on optimizer steps, then writes its dash state, LoRA factors and run facts to
``DIR/rank{r}.safetensors`` for the test to compare across ranks. With the default ``dash_svd="background"`` each
rank computes the SVDs of its share of the layers ahead of the switch; the layers it computed and the switch's
records with the LoRA factors they were selected on (``switch.*``) are written too, for the test's 1-process
reference.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

import shared
from tests.helpers import LLAMA_TARGETS, lm_batches, tiny_llama

WARMUP, DIRECTIONS, RANK, ACCUM, OPT_STEPS = 3, 2, 4, 2, 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    torch.set_num_threads(1)
    accelerator = Accelerator(gradient_accumulation_steps=ACCUM)
    rank = accelerator.process_index

    model = tiny_llama(seed=0)  # identical on every rank
    config = shared.AdapterConfig(method="dash", r=RANK, alpha=8, target_modules=LLAMA_TARGETS,
                                  dash_warmup_steps=WARMUP, dash_directions=DIRECTIONS, seed=0, dropout=0.0)
    adapter = shared.attach(model, config)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None

    # each rank sees different data: DDP must average the gradients for the ranks to stay in sync
    batches = lm_batches(n=OPT_STEPS * ACCUM, batch_size=4, seq=12, seed=1000 + rank)
    model.train()
    switched_at, lam_grad_before_switch, missing_grads, computed = None, [], [], None
    at_switch: dict[str, torch.Tensor] = {}
    for batch in batches:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                # with find_unused_parameters=False every trainable parameter must have a gradient here,
                # λ included before the switch (it joins the graph with a zero contribution)
                missing_grads += [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
                if not adapter.switched:
                    lam_grad_before_switch += [None if m.tsd_dash["default"].lam.grad is None
                                               else float(m.tsd_dash["default"].lam.grad.abs().max())
                                               for m in adapter.dash_layers.values()]
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients and adapter.step(optimizer):
            switched_at = adapter.num_steps
            at_switch = switch_record(adapter)
        bases = adapter.switch_bases
        if computed is None and bases is not None:
            computed = [n for i, chunk in enumerate(bases.chunks) if bases.computes(i) for n in chunk]

    tensors: dict[str, torch.Tensor] = {"num_steps": torch.tensor(adapter.num_steps, dtype=torch.int64), **at_switch}
    for name, _layer in adapter.layers.items():
        B, A = adapter.lora_factors(name)
        dash = adapter.dash_term(name)
        for key, t in (("lora_A", A), ("lora_B", B), ("U", dash.U), ("Vh", dash.Vh), ("lam", dash.lam),
                       ("indices", dash.indices)):
            tensors[f"{name}.{key}"] = t.detach().cpu().contiguous().clone()
    meta = {
        "rank": rank,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "ddp_wrapped": ddp is not None,
        "find_unused_parameters": None if ddp is None else bool(ddp.find_unused_parameters),
        "switched": adapter.switched,
        "switched_at": switched_at,
        "num_steps": adapter.num_steps,
        "micro_batches": len(batches),
        "missing_grads": sorted(set(missing_grads)),
        "lam_grad_before_switch_max": (None if None in lam_grad_before_switch
                                       else max(lam_grad_before_switch, default=None)),
        "first_tokens": batches[0]["input_ids"][0, :4].tolist(),
        "computed_layers": computed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / f"rank{rank}.safetensors"), metadata={"meta": json.dumps(meta)})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    print(f"rank {rank}: {json.dumps(meta)}", flush=True)


def switch_record(adapter: shared.Adapter) -> dict[str, torch.Tensor]:
    """Right after the switch (which changes no LoRA factor): the factors it saw and what it selected."""
    out = {}
    for name in adapter.dash_layers:
        B, A = adapter.lora_factors(name)
        dash = adapter.dash_term(name)
        for key, t in (("lora_A", A), ("lora_B", B), ("U", dash.U), ("Vh", dash.Vh), ("indices", dash.indices),
                       ("sigma", dash.sigma), ("delta_sigma", dash.delta_sigma), ("energy", dash.energy)):
            out[f"switch.{name}.{key}"] = t.detach().cpu().contiguous().clone()
    return out


if __name__ == "__main__":
    main()
