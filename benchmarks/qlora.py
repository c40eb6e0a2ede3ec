"""QLoRA on SmolLM2-135M: a 4-bit NF4 base against the fp32 one (``docs/text.md#qlora``).

    python -m benchmarks.qlora                                   # both parts -> results/qlora.json
    python -m benchmarks.qlora --part train --steps 12 --eval_examples 100
    python -m benchmarks.qlora --part residual --bases nf4 bfloat16 --json /tmp/residual.json

- ``train``: lora and dash on the ``smollm2`` setting of :mod:`benchmarks.text_quality` (the socialiqa validation
  split of the ``commonsense`` asset, 1 200 training and 400 held-out items, batch 8, rank 4, lr 2e-3, the dash
  switch halfway), once on the fp32 base and once with ``--load_in_4bit`` (NF4, double quantisation, fp32
  compute); the accuracy before training is evaluated in the lora runs (dash starts from the same base). Each run
  is its own process: its peak RSS (``ru_maxrss``) covers loading, the init, training and the evaluations. Step
  time is the median loop time per update, the first step and the switch step left out. The load average of the
  machine is recorded before and after every run.
- ``residual``: the inits that subtract their initial update from W (pissa, lora_init with its gradient
  estimator, lora_ga; tsd's init is lora_init's) on the fp32, bf16 and 4-bit bases: per base, the error of the
  stored residual (``Adapter.residual_errors()``), the distance of the model's starting weights from the fp32 W
  (‖W_start - W‖_F / ‖W‖_F, medians over layers; W_start = stored residual + γ₀B₀A₀), the same distance for the
  base alone (plain LoRA's start), and the mean loss on 4 held-out batches at step 0.

A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "qlora.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
QUANT = {"fp32": [], "nf4": ["--load_in_4bit", "--bnb_4bit_use_double_quant"]}
RESIDUALISED = {"pissa": {}, "lora_init": dict(lora_init_estimator="gradient", lora_init_steps=4),
                "lora_ga": dict(lora_ga_batches=4)}


def train_cell(method: str, base: str, steps: int, eval_examples: int, work: Path) -> dict[str, Any]:
    """One training run of the text trainer (in this process, which the parent started for it)."""
    from accelerate.state import AcceleratorState

    from tsd_common.training import read_loss_log
    from tsd_text.train import main, parse_args

    from .text_quality import train_argv

    AcceleratorState._reset_state(reset_partial_state=True)
    load_before = os.getloadavg()
    cfg = {"model": "smollm2", "method": method, "rank": 4, "lr": 2e-3, "seed": 0, "steps": steps,
           "eval_examples": eval_examples}
    extra = ["--dash_warmup_steps", str(steps // 2)]  # the switch halfway, as at 30 of text_quality's 60 steps
    if method != "lora":
        extra.append("--no-eval_before")  # the same base as lora's run: its accuracy before training is that one
    result = main(parse_args([*train_argv(cfg, work), *QUANT[base], *extra]))
    elapsed = [0.0] + [row["elapsed_s"] for row in read_loss_log(work)]
    step_s = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    switch = result.results["train"]["dash_switch_step"]
    kept = [t for i, t in enumerate(step_s, 1) if i not in (1, switch)]
    before = result.results["before"]
    return {"method": method, "base": base, "steps": steps, "before": before and before["accuracy"],
            "after": result.results["after"]["accuracy"], "num_examples": result.results["after"]["num_examples"],
            "median_step_s": statistics.median(kept), "switch_step_s": step_s[switch - 1] if switch else None,
            "runtime_s": result.results["train"]["runtime_s"], "final_loss": result.results["train"]["final_loss"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_before": load_before, "load_after": os.getloadavg()}


def _batches(tokenizer: Any, n: int, offset: int) -> list[dict[str, torch.Tensor]]:
    """``n`` training batches (8 rows, 128 tokens) of the socialiqa split, from row ``8 * offset`` on."""
    from tsd_common.assets import require_asset
    from tsd_text import causal
    from tsd_text.data import ensure_pad_token, load_mc

    ensure_pad_token(tokenizer)
    examples = load_mc(require_asset("commonsense") / "socialiqa" / "validation.jsonl")[8 * offset:8 * (offset + n)]
    data = causal.prepare(tokenizer, examples, examples[:1], max_length=128)
    return [data.collate_train(data.train[8 * i:8 * (i + 1)]) for i in range(n)]


def _load(base: str) -> Any:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tsd_common.assets import require_asset

    path = require_asset("smollm2")
    if base == "nf4":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=q).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, base)).eval()


@torch.no_grad()
def _loss(model: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    return statistics.mean(float(model(**b).loss) for b in batches)


def residual_cell(base: str) -> dict[str, Any]:
    """The residualising inits on one base, against the fp32 weights."""
    from transformers import AutoTokenizer

    import shared
    from shared.layers import dense_weight
    from shared.quantization import pin_layout
    from tsd_common.assets import require_asset

    tokenizer = AutoTokenizer.from_pretrained(require_asset("smollm2"))
    init_batches, held_out = _batches(tokenizer, 4, 0), _batches(tokenizer, 4, 100)
    reference = _load("float32")
    names = sorted(n for n, _ in reference.named_modules() if n.rsplit(".", 1)[-1] in TARGETS)
    W = {n: reference.get_submodule(n).weight.detach().float() for n in names}
    out: dict[str, Any] = {"base": base, "fp32_loss": _loss(reference, held_out)}
    del reference
    model = _load(base)
    pin_layout(model)
    out["base_start_error"] = statistics.median(
        float((dense_weight(model.get_submodule(n)).float() - W[n]).norm() / W[n].norm()) for n in names)
    out["base_loss"] = _loss(model, held_out)
    del model
    for method, options in RESIDUALISED.items():
        model = _load(base)
        cfg = shared.AdapterConfig(method=method, r=4, alpha=8, target_modules=TARGETS, **options)
        adapter = shared.attach(model, cfg, data=init_batches, progress=False)
        start = [float((adapter.original_weight(n) - W[n]).norm() / W[n].norm()) for n in names]
        errors = list(adapter.residual_errors().values())
        out[method] = {"residual_error_median": statistics.median(errors), "residual_error_max": max(errors),
                       "start_error_median": statistics.median(start), "loss": _loss(model, held_out)}
        del model, adapter
    out["load_after"] = os.getloadavg()
    return out


def _child(argv: list[str]) -> dict[str, Any]:
    """Run one cell in a fresh process (its own peak RSS); its JSON is the last line of its stdout."""
    cmd = [sys.executable, "-m", "benchmarks.qlora", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, Any]) -> str:
    lines = []
    if results.get("train"):
        lines += ["| method | base | accuracy before → after | median step s | peak RSS MiB | "
                  "load avg (1 min) before/after |", "|---|---|---|---|---|---|"]
        for r in results["train"]:
            before = "–" if r["before"] is None else f"{r['before']:.3f}"
            lines.append(f"| {r['method']} | {r['base']} | {before} → {r['after']:.3f} | "
                         f"{r['median_step_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                         f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |")
    if results.get("residual"):
        lines += ["", "| base | init | stored residual error (median / max) | start ‖W₀ − W‖/‖W‖ (median) | "
                  "loss at step 0 |", "|---|---|---|---|---|"]
        for r in results["residual"]:
            lines.append(f"| {r['base']} | none (plain LoRA) | – | {r['base_start_error']:.2e} | {r['base_loss']:.4f} "
                         f"(fp32 {r['fp32_loss']:.4f}) |")
            for method in RESIDUALISED:
                m = r[method]
                lines.append(f"| {r['base']} | {method} | {m['residual_error_median']:.2e} / "
                             f"{m['residual_error_max']:.2e} | {m['start_error_median']:.2e} | {m['loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["train", "residual", "both"], default="both")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval_examples", type=int, default=400, help="held-out items scored (at most 400)")
    p.add_argument("--bases", nargs="+", default=["float32", "bfloat16", "nf4"], choices=["float32", "bfloat16", "nf4"],
                   help="the bases of the residual part")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--child", choices=["train", "residual"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "train":
        with tempfile.TemporaryDirectory(prefix="tsd-qlora-") as tmp:
            print(json.dumps(train_cell(args.method, args.base, args.steps, args.eval_examples, Path(tmp))))
        return
    if args.child == "residual":
        print(json.dumps(residual_cell(args.base)))
        return
    results: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if args.part in ("residual", "both"):
        results["residual"] = [_child(["--child", "residual", "--base", b]) for b in args.bases]
        args.json.write_text(json.dumps(results, indent=2))
    if args.part in ("train", "both"):
        cell = ["--child", "train", "--steps", str(args.steps), "--eval_examples", str(args.eval_examples)]
        results["train"] = [_child([*cell, "--method", m, "--base", b]) for m in ("lora", "dash") for b in QUANT]
    args.json.write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
