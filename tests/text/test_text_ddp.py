"""Two real processes (gloo on CPU) of ``apps/train_text.py`` for both tasks, launched by ``accelerate launch``.

Launcher: ``accelerate launch --cpu --num_processes 2`` starts ONE process on accelerate 1.x (its simple launcher
forks only with an mpirun hostfile), so the run uses accelerate's torchrun path, ``--multi_gpu --num_processes 2
--num_machines 1 --gpu_ids all``, with ``ACCELERATE_USE_CPU=true``; the trainer records the world size it ran with.

Evaluation must count every example exactly once: the evaluation sets have an odd size, so accelerate pads the
last batch of one rank with repeated samples, which ``gather_for_metrics`` must drop. The metrics of the untrained
model must equal those of a single-process run of the same evaluation.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, launcher_env
from tsd_text.tiny import write_toy_classification, write_toy_mc
from tsd_text.train import main, parse_args

COMMON = ["--rank", "4", "--lora_alpha", "8", "--method", "dash", "--dash_warmup_steps", "2", "--dash_directions", "2",
          "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--max_steps", "4",
          "--learning_rate", "1e-2", "--seed", "3", "--no-report_plot"]
TIMEOUT_S = 300


def _launch(app_args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--gpu_ids", "all", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           str(REPO / "apps" / "train_text.py"), *app_args]
    env = launcher_env(ACCELERATE_USE_CPU="true", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"2-process run failed (rc={proc.returncode})\n{proc.stderr[-6000:]}"
    return proc


def _check(out: Path, single: dict, n_eval: int) -> dict:
    evals = json.loads((out / "eval_results.json").read_text())
    train = json.loads((out / "train_results.json").read_text())
    assert train["world_size"] == 2 and train["steps"] == 4 and train["dash_switch_step"] == 2, train
    for when in ("before", "after"):
        assert evals[when]["num_examples"] == n_eval, evals  # no duplicated or dropped samples
    assert evals["before"] == single["before"], (evals["before"], single["before"])
    assert (out / "adapter_model.safetensors").is_file()
    return evals


@pytest.mark.slow
def test_two_processes_causal_mc(tmp_path):
    task, model_dir = write_toy_mc(tmp_path / "mc", 25)  # eval split 9: odd over 2 ranks x batch 2
    args = ["--model_name_or_path", str(model_dir), "--task", "causal-mc", "--train_file", str(task),
            "--eval_split", "9", "--target_modules", "q_proj,v_proj,down_proj", *COMMON]
    _launch([*args, "--output_dir", str(tmp_path / "ddp")])
    single = main(parse_args([*args, "--output_dir", str(tmp_path / "one"), "--max_steps", "1"])).results
    _check(tmp_path / "ddp", single, 9)


@pytest.mark.slow
def test_two_processes_classification(tmp_path):
    train, eval_, model_dir = write_toy_classification(tmp_path / "cls", 20, 7, kind="bert")
    args = ["--model_name_or_path", str(model_dir), "--task", "classification", "--train_file", str(train),
            "--eval_file", str(eval_), "--target_modules", "query,value", *COMMON]
    _launch([*args, "--output_dir", str(tmp_path / "ddp")])
    single = main(parse_args([*args, "--output_dir", str(tmp_path / "one"), "--max_steps", "1"])).results
    evals = _check(tmp_path / "ddp", single, 7)
    assert set(evals["after"]) == {"accuracy", "f1", "matthews_correlation", "num_examples"}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["--method", "eva", "--adapter_options", "eva_max_batches=3", "eva_use_label_mask=false"],
    ["--method", "lora_init", "--adapter_options", "lora_init_steps=3"],
    ["--method", "tsd", "--load_in_4bit", "--adapter_options", "lora_init_steps=3"],  # QLoRA + DDP
], ids=["eva", "lora_init", "tsd-4bit"])
def test_two_processes_pool_the_init_statistics(tmp_path, extra):
    """Each process reads its own init batches and the init pools them (EVA gathers every step's rows, the
    gradient estimator sums its gradients): the run completes only if every rank ends with the same adapter, which
    attach checks by fingerprint. The 4-bit run requantises tsd's residual on every rank and switches at step 2."""
    if "--load_in_4bit" in extra:
        pytest.importorskip("bitsandbytes", reason="--load_in_4bit needs bitsandbytes (the 'quant' extra)")
    task, model_dir = write_toy_mc(tmp_path / "mc", 25)
    args = ["--model_name_or_path", str(model_dir), "--task", "causal-mc", "--train_file", str(task),
            "--eval_split", "9", "--target_modules", "q_proj,v_proj,down_proj", *COMMON, *extra,
            "--output_dir", str(tmp_path / "ddp")]
    _launch(args)
    train = json.loads((tmp_path / "ddp" / "train_results.json").read_text())
    assert train["world_size"] == 2 and train["steps"] == 4, train
    assert train["dash_switch_step"] == (2 if "tsd" in extra else None), train


def test_init_batches_give_each_process_its_own_share(tmp_path):
    """Process p of N reads batches p, p + N, ... of one seeded order: together, the first N·k batches."""
    from types import SimpleNamespace

    import torch

    from tsd_text.train import init_batches

    data = SimpleNamespace(train=list(range(20)), collate_train=torch.tensor)
    config = SimpleNamespace(per_device_train_batch_size=3, seed=5)
    single = [b.tolist() for b in init_batches(data, config, 0, 1)]
    shares = [[b.tolist() for b in init_batches(data, config, p, 2)] for p in range(2)]
    assert shares[0] == single[0::2] and shares[1] == single[1::2]
    assert sorted(x for share in shares for b in share for x in b) == list(range(20))
