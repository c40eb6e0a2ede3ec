"""Real 2-process DDP runs (gloo on CPU): LoRA-Dash through ``accelerate launch``, and the data-driven inits' pooled
statistics (``ddp_pooled_worker.py``, under ``torch.distributed.run``) against one process on every rank's batches.

Checks that under DDP with accelerate's gradient accumulation the dash switch happens on the same optimizer
step on every rank, that every rank ends with bitwise identical directions, indices, λ and LoRA factors
although each rank trained on different data, and that DDP's default ``find_unused_parameters=False`` works
(λ is in the graph before the switch).

Launcher note: ``accelerate launch --cpu --num_processes 2`` starts ONE process (accelerate's simple launcher
forks only when it is given an ``--mpirun_hostfile``), so the run would silently be single-process. The test
therefore launches with ``--multi_gpu`` (accelerate's torchrun path) and ``ACCELERATE_USE_CPU=true``, which
gives two gloo/CPU processes on any machine, and asserts world_size == 2 from inside the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import REPO, free_port, launcher_env

WORKER = Path(__file__).resolve().parent / "ddp_dash_worker.py"
WORLD = 2
TIMEOUT_S = 240


def _launch(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1", "--gpu_ids", "all",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           str(WORKER), "--out", str(out)]
    env = launcher_env(ACCELERATE_USE_CPU="true",
                       PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"DDP run timed out after {TIMEOUT_S} s\ncmd: {' '.join(cmd)}\n"
                    f"--- stdout ---\n{e.stdout}\n--- stderr ---\n{e.stderr}")


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        return meta, {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-process run, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("ddp")
    return out, _launch(out)


@pytest.mark.slow
def test_ddp_dash_two_processes_stay_identical(ddp_run):
    out, proc = ddp_run
    log = f"cmd: {' '.join(proc.args)}\n--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
    assert proc.returncode == 0, f"DDP run failed (rc={proc.returncode})\n{log}"
    files = [out / f"rank{r}.safetensors" for r in range(WORLD)]
    assert all(f.is_file() for f in files), (f"missing rank files in {out}: "
                                             f"{sorted(os.listdir(out)) if out.exists() else []}\n{log}")

    (meta0, t0), (meta1, t1) = (_read(f) for f in files)
    for r, meta in enumerate((meta0, meta1)):
        assert meta["rank"] == r
        assert meta["world_size"] == WORLD, f"not a {WORLD}-process run: {meta}\n{log}"
        assert meta["distributed_type"].endswith("MULTI_CPU") and meta["backend"] == "gloo", meta
        assert meta["ddp_wrapped"], meta
        # DDP's defaults were enough: no find_unused_parameters, and no trainable parameter lacked a gradient
        assert meta["find_unused_parameters"] is False, meta
        assert meta["missing_grads"] == [], meta
        # before the switch λ is in the graph with an exactly zero gradient
        assert meta["lam_grad_before_switch_max"] == 0.0, meta
        assert meta["micro_batches"] == 12 and meta["num_steps"] == 6, meta  # 12 micro-batches, accumulation 2
        assert meta["switched"] and meta["switched_at"] == 3, meta
    assert meta0["first_tokens"] != meta1["first_tokens"], "the ranks must train on different data"

    assert t0.keys() == t1.keys()
    assert int(t0["num_steps"]) == int(t1["num_steps"]) == 6
    layers = sorted({k.rsplit(".", 1)[0] for k in t0 if k != "num_steps" and not k.startswith("switch.")})
    assert len(layers) == 2 * 7  # tiny llama: 2 blocks x 7 targets
    for k in t0:
        # gradients are all-reduced, so every rank applies the same update to the same bytes: bitwise equal
        assert t0[k].dtype == t1[k].dtype and torch.equal(t0[k], t1[k]), (
            f"{k} differs across ranks: max |diff| = {(t0[k].double() - t1[k].double()).abs().max():.3g}")
    for name in layers:
        idx = t0[f"{name}.indices"]
        assert idx.unique().numel() == idx.numel() == 2, (name, idx)
        assert t0[f"{name}.U"].abs().sum() > 0 and t0[f"{name}.Vh"].abs().sum() > 0, f"{name}: directions unset"
        assert (t0[f"{name}.lam"] != 0).all(), f"{name}: λ did not train after the switch: {t0[f'{name}.lam']}"
        assert t0[f"{name}.lora_B"].abs().sum() > 0, f"{name}: LoRA B did not train"


@pytest.mark.slow
def test_pooled_init_statistics_equal_one_process_on_every_rank_s_batches(tmp_path):
    """2 gloo processes, each on its own batches: the pooled statistics (LoRA-DA's G, Z, diag(Y); the mean gradient
    of LoRA-Init's estimator and LoRA-GA) and the adapters of eva, lora_da, lora_init and lora_ga equal one process
    reading every rank's batches, to fp32 tolerance; the ranks' adapters are bitwise equal (the warm-up estimator's
    too), and attach's fingerprint check stops ranks whose inits differ."""
    from tests.core.ddp_pooled_worker import METHODS, run

    worker = Path(__file__).resolve().parent / "ddp_pooled_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(worker), "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"pooled run failed (rc={proc.returncode})\n{proc.stderr[-6000:]}"
    run(tmp_path / "ref")
    _, ref = _read_plain(tmp_path / "ref" / "rank0.safetensors")
    (meta0, t0), (meta1, t1) = (_read_plain(tmp_path / "ddp" / f"rank{r}.safetensors") for r in range(WORLD))
    assert meta0["world_size"] == meta1["world_size"] == WORLD
    assert meta0["first_tokens"] != meta1["first_tokens"], "the ranks must read different batches"
    for meta in (meta0, meta1):
        assert "differs across processes" in meta["mismatch"], meta
    assert t0.keys() == t1.keys()
    for key in t0:
        assert torch.equal(t0[key], t1[key]), f"{key} differs across ranks"
    assert {k.split(".", 1)[0] for k in t0} == set(METHODS)
    compared = [k for k in t0 if not k.startswith("lora_init_warmup.")]
    assert set(compared) == set(ref), sorted(set(compared) ^ set(ref))
    assert sum(".stat." in k for k in compared) == 6 * (3 + 1 + 1)  # 6 layers: G, Z, y (lora_da); G; G
    for key in compared:
        torch.testing.assert_close(t0[key], ref[key], rtol=1e-4, atol=1e-6, msg=key)


def _read_plain(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}")), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.slow
def test_ddp_switch_splits_the_svds_and_equals_one_process(ddp_run):
    """Each rank computes the SVDs of its share of the layers (ahead of the switch, the default "background"), and
    the directions every rank ends with are bitwise those one process selects from the same LoRA factors."""
    out, proc = ddp_run
    assert proc.returncode == 0, f"DDP run failed (rc={proc.returncode})\n{proc.stderr[-8000:]}"
    (meta0, t0), (meta1, t1) = (_read(out / f"rank{r}.safetensors") for r in range(WORLD))
    layers = sorted({k[len("switch."):].rsplit(".", 1)[0] for k in t0 if k.startswith("switch.")})
    assert len(layers) == 2 * 7
    mine, theirs = set(meta0["computed_layers"]), set(meta1["computed_layers"])
    assert mine and theirs and not mine & theirs and mine | theirs == set(layers), (mine, theirs)

    import shared
    from tests.core.ddp_dash_worker import DIRECTIONS, RANK, WARMUP
    from tests.helpers import LLAMA_TARGETS, tiny_llama

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the SVD's bits depend on the thread count
    try:
        model = tiny_llama(seed=0)
        config = shared.AdapterConfig(method="dash", r=RANK, alpha=8, target_modules=LLAMA_TARGETS,
                                      dash_warmup_steps=WARMUP, dash_directions=DIRECTIONS, seed=0, dash_svd="switch")
        adapter = shared.attach(model, config)
        for name, layer in adapter.layers.items():
            layer.lora_A["default"].weight.data.copy_(t0[f"switch.{name}.lora_A"])
            layer.lora_B["default"].weight.data.copy_(t0[f"switch.{name}.lora_B"])
        adapter.switch()
    finally:
        torch.set_num_threads(threads)
    for name in layers:
        dash = adapter.dash_term(name)
        for key in ("U", "Vh", "indices", "sigma", "delta_sigma", "energy"):
            want = getattr(dash, key)
            for rank, got in enumerate((t0, t1)):
                assert torch.equal(got[f"switch.{name}.{key}"], want), f"rank {rank}: {name}.{key} differs"
