"""LoRA-Dash on a model sharded by FSDP2 (``fully_shard``, 2 gloo/CPU processes) equals the unsharded run.

The switch reads the whole base weight and LoRA factors, which FSDP2 holds as DTensor shards: the core
gathers them (``full_tensor``) on every rank and scatters the chosen directions back into the sharded U, V.
Both ranks see the same batches, so the sharded run must reproduce the single-process reference (see
``tests/fsdp_dash_worker.py``): same switch step, same directions, same factors and losses, and the same
exported peft and native files, written once by rank 0.

Launched with ``torch.distributed.run``: accelerate enables FSDP only on GPUs (``ACCELERATE_USE_CPU`` gives
``MULTI_CPU``, i.e. DDP), so the trainers' accelerate path is not what this covers; they refuse parameter
sharding up front (``tests/test_train_sdxl.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.core.fsdp_dash_worker import DIRECTIONS, WARMUP, run
from tests.helpers import REPO, free_port, launcher_env

WORKER = Path(__file__).resolve().parent / "fsdp_dash_worker.py"
TIMEOUT_S = 240


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}")), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
@pytest.mark.parametrize("dash_svd", ["background", "upfront"])
def test_fsdp2_dash_matches_unsharded(tmp_path, dash_svd):
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), "--out", str(tmp_path / "fsdp"), "--dash_svd", dash_svd]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"FSDP2 run failed (rc={proc.returncode})\n{proc.stderr[-6000:]}"
    ref_meta = run(tmp_path / "ref", shard=False, dash_svd=dash_svd)
    _, ref = _read(tmp_path / "ref" / "state0.safetensors")

    for rank in (0, 1):
        meta, got = _read(tmp_path / "fsdp" / f"state{rank}.safetensors")
        assert meta["sharded"] and meta["world_size"] == 2 and meta["switched_at"] == WARMUP, meta
        # "upfront" computed every SVD (the 4 shapes of the tiny LLaMA) at step 1, on every rank; "background"
        # cannot gather in a thread and leaves them to the switch
        assert meta["svd_files_at_step_1"] == (4 if dash_svd == "upfront" else None), meta
        assert meta["losses"] == pytest.approx(ref_meta["losses"], abs=1e-5)
        assert got.keys() == ref.keys()
        for key, want in ref.items():
            if key.endswith(".indices"):
                assert torch.equal(got[key], want), key
                assert want.numel() == DIRECTIONS
            else:
                torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6, msg=key)
        assert any(got[k].abs().max() > 0 for k in got if k.endswith(".lam")), "λ never trained after the switch"

    for sub, file in (("peft", "adapter_model.safetensors"), ("native", "tsd_adapter.safetensors")):
        written = sorted(p.name for p in (tmp_path / "fsdp" / sub).iterdir())
        assert file in written and not [n for n in written if n.startswith(".")], written  # one writer, no temp left
        _, a = _read(tmp_path / "fsdp" / sub / file)
        _, b = _read(tmp_path / "ref" / sub / file)
        assert a.keys() == b.keys()
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{sub}: {key}")
    assert json.loads((tmp_path / "fsdp" / "peft" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "ref" / "peft" / "adapter_config.json").read_text())
