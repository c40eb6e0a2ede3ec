"""Worker for ``tests/test_fsdp.py``: LoRA-Dash trained on a model sharded by FSDP2 (``fully_shard``), or not.

``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_dash_worker.py --out DIR`` shards a seeded tiny
LLaMA (one FSDP unit per decoder layer plus the root) over 2 gloo/CPU ranks; the test calls :func:`run` with
``shard=False`` in its own process for the unsharded reference. Every rank sees the *same* batches, so the
averaged gradients equal the single-process ones and the two runs must agree to float rounding. Each run
switches at step t=3, trains to step 6, exports peft and native files (on every rank: the gathers are
collective, rank 0 writes), and writes the gathered factors and dash state to ``DIR/state{rank}.safetensors``.
``--dash_svd`` sets when the switch's SVDs run: under FSDP2 "background" leaves them to the switch, "upfront"
computes them at the first step (the weights are gathered collectively, in the same order on every rank).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import shared
from shared.layers import full_tensor, is_sharded
from tests.helpers import LLAMA_TARGETS, lm_batches, tiny_llama

WARMUP, DIRECTIONS, RANK, STEPS = 3, 3, 4, 6


def run(out: Path, shard: bool, dash_svd: str = "background") -> dict:
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    config = shared.AdapterConfig(method="dash", r=RANK, alpha=8, target_modules=LLAMA_TARGETS,
                                  dash_warmup_steps=WARMUP, dash_directions=DIRECTIONS, seed=0, dropout=0.0,
                                  dash_svd=dash_svd)
    adapter = shared.attach(model, config)
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    model.train()
    switched_at, losses, prepared = None, [], None
    for batch in lm_batches(n=STEPS, batch_size=4, seq=12, seed=7):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        if adapter.step(optimizer):
            switched_at = adapter.num_steps
        if adapter.num_steps == 1:  # the SVD files written at the first step (none: left to the switch)
            prepared = None if adapter.switch_bases is None else len(adapter.switch_bases.files)
    rank = torch.distributed.get_rank() if shard else 0
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name in adapter.layers:
        B, A = adapter.lora_factors(name)
        dash = adapter.dash_term(name)
        tensors.update({f"{name}.lora_A": A, f"{name}.lora_B": B, f"{name}.indices": dash.indices,
                        **{f"{name}.{key}": full_tensor(getattr(dash, key)) for key in ("U", "Vh", "lam")}})
    shared.export_lora(adapter, out / "peft", "peft")
    shared.export_lora(adapter, out / "native", "tsd")
    tensors = {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}
    meta = {"rank": rank, "sharded": is_sharded(model), "switched_at": switched_at, "losses": losses,
            "svd_files_at_step_1": prepared,
            "world_size": torch.distributed.get_world_size() if shard else 1}
    save_file(tensors, str(out / f"state{rank}.safetensors"), metadata={"meta": json.dumps(meta)})
    return meta


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dash_svd", default="background")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        print(json.dumps(run(args.out, shard=True, dash_svd=args.dash_svd)), flush=True)
        torch.distributed.barrier()  # rank 0 may still be writing: tear gloo down only once both are done
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
