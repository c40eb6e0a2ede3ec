"""Training throughput of ``apps/train_text.py`` against a stock ``transformers.Trainer`` + peft LoRA run.

    python -m benchmarks.text_throughput                     # both tasks, real assets when fetched
    python -m benchmarks.text_throughput --task causal-mc --steps 10 --json out.json

For each task, in one process and on the same model, data, batch size, rank and targets, three runs:

- ``trainer+peft``: ``get_peft_model(model, LoraConfig(...))`` trained by ``Trainer`` on the trainer's own
  tokenised rows and collator (so both see the same tokens);
- ``ours lora`` and ``ours dash``: ``tsd_text.train.main`` (what ``apps/train_text.py`` runs).

Throughput is real (non-pad) training tokens per second of the training loop: ``train_results.json`` for ours (the
loop without evaluation), the wall time of ``Trainer.train()`` for the baseline. The dash time includes its one-off
switch (the SVDs of every adapted weight); the median step time leaves out the first step and the switch step, and
the switch step's own time is shown. Models: SmolLM2-135M on social_iqa (the SIQA dev set of the ``commonsense``
asset; BIG-bench's copy of it until 2026-12) and MiniLM on Pang & Lee polarity when fetched
(``scripts/fetch_assets.py``), else tiny models on toy data (``tsd_text.tiny``). A benchmark, not a test: numbers depend
on the machine and its load.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TARGETS = {"causal-mc": "q_proj,k_proj,v_proj,up_proj,down_proj", "classification": "query,key,value,dense"}


def _assets(task: str, root: Path) -> tuple[list[str], str]:
    """(data arguments, model name) for ``task``: the real assets when fetched, else toy ones written to ``root``."""
    from tsd_common.assets import asset_path
    from tsd_text.tiny import write_toy_classification, write_toy_mc

    if task == "causal-mc" and asset_path("smollm2") and asset_path("commonsense"):
        data = ["--train_file", str(asset_path("commonsense") / "socialiqa" / "validation.jsonl"),
                "--eval_split", "200"]
        return ["--model_name_or_path", str(asset_path("smollm2")), *data], "SmolLM2-135M / social_iqa"
    if task == "classification" and asset_path("minilm") and asset_path("polarity"):
        data = ["--train_file", str(asset_path("polarity") / "polarity.csv"), "--eval_split", "800"]
        return ["--model_name_or_path", str(asset_path("minilm")), *data], "MiniLM-L6 / polarity"
    if task == "causal-mc":
        task_file, model = write_toy_mc(root / "mc", 200)
        return (["--model_name_or_path", str(model), "--train_file", str(task_file), "--eval_split", "8"],
                "tiny LLaMA / toy")
    train, eval_, model = write_toy_classification(root / "cls", 400, 8)
    return (["--model_name_or_path", str(model), "--train_file", str(train), "--eval_file", str(eval_)],
            "tiny DeBERTa / toy")


def _trainer_peft(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """The baseline: stock peft LoRA in a stock Trainer, on the rows and collator of our data pipeline."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from tsd_text.data import ensure_pad_token
    from tsd_text.train import TASKS, TextTrainConfig, load_examples, resolve_targets

    task, load = TASKS[args.task]
    tok = AutoTokenizer.from_pretrained(args.model_name_or_path)
    ensure_pad_token(tok)
    data = task.prepare(tok, *load_examples(TextTrainConfig.from_args(args), load), args.max_length)
    model, head = task.load_model(args.model_name_or_path, data, tok)
    config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, task_type=task.TASK_TYPE, modules_to_save=head,
                        target_modules=resolve_targets(model, args.target_modules, head))
    model = get_peft_model(model, config)
    tokens = [0]

    def count(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # in the forward, not the collator: accelerate's loader collates one batch ahead
        tokens[0] += int(kwargs["attention_mask"].sum())

    model.register_forward_pre_hook(count, with_kwargs=True)
    targs = TrainingArguments(output_dir=str(out), max_steps=args.max_steps, learning_rate=args.learning_rate,
                              per_device_train_batch_size=args.per_device_train_batch_size, seed=args.seed,
                              report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=10**6)
    times = [time.perf_counter()]

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__) -> None:
            times.append(time.perf_counter())

    trainer = Trainer(model=model, args=targs, train_dataset=data.train, data_collator=data.collate_train,
                      callbacks=[StepTimes()])
    times[0] = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - times[0]
    return {"tokens": tokens[0], "runtime_s": runtime, "tokens_per_s": tokens[0] / runtime,
            "step_s": [b - a for a, b in itertools.pairwise(times)]}


def _step_times(out_dir: Path) -> list[float]:
    """Per-update loop times from our ``loss_log.csv`` (elapsed_s differences)."""
    with open(out_dir / "loss_log.csv") as f:
        elapsed = [0.0] + [float(row["elapsed_s"]) for row in csv.DictReader(f)]
    return [b - a for a, b in itertools.pairwise(elapsed)]


def bench_task(task: str, steps: int, batch_size: int, root: Path) -> tuple[str, dict[str, dict[str, float]]]:
    from tsd_text.train import main, parse_args

    data_args, name = _assets(task, root)
    common = [*data_args, "--task", task, "--rank", "8", "--lora_alpha", "16", "--target_modules", TARGETS[task],
              "--max_steps", str(steps), "--per_device_train_batch_size", str(batch_size), "--learning_rate", "5e-4",
              "--max_length", "128", "--seed", "0", "--max_eval_samples", "8", "--no-eval_before", "--no-report_plot",
              "--dash_warmup_steps", str(max(1, steps // 2)), "--dash_directions", "8"]
    runs = {"trainer+peft lora": _trainer_peft(parse_args([*common, "--output_dir", str(root / "trainer")]),
                                               root / "t")}
    for method in ("lora", "dash"):
        result = main(parse_args([*common, "--method", method, "--output_dir", str(root / method)]))
        runs[f"ours {method}"] = {**result.results["train"], "step_s": _step_times(root / method)}
    return name, runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["causal-mc", "classification", "both"], default="both")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: 10 causal-mc, 30 cls)")
    p.add_argument("--batch_size", type=int, default=None, help="default: 8 causal-mc, 32 classification")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tasks = ["causal-mc", "classification"] if args.task == "both" else [args.task]
    rows, table = [], {}
    with tempfile.TemporaryDirectory(prefix="tsd-text-bench-") as tmp:
        for task in tasks:
            steps = args.steps or (10 if task == "causal-mc" else 30)
            batch = args.batch_size or (8 if task == "causal-mc" else 32)
            name, runs = bench_task(task, steps, batch, Path(tmp) / task)
            table[task] = {"model": name, "steps": steps, "batch_size": batch, "runs": runs}
            base, lora = runs["trainer+peft lora"]["tokens_per_s"], runs["ours lora"]["tokens_per_s"]
            switch = runs["ours dash"]["dash_switch_step"]
            for run, r in runs.items():
                steps = r["step_s"]
                rest = [t for i, t in enumerate(steps, 1) if i not in (1, switch)]  # no first, no switch step
                r["median_step_s"] = statistics.median(rest)
                rows.append(f"| {task} | {name} | {run} | {r['tokens']} | {r['runtime_s']:.1f} | "
                            f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} | {r['median_step_s']:.3f} |")
            dash = runs["ours dash"]
            rows.append(f"| {task} | {name} | dash vs ours lora | | {lora / dash['tokens_per_s'] - 1:+.1%} time | | | "
                        f"{dash['median_step_s'] / runs['ours lora']['median_step_s'] - 1:+.1%}; switch step "
                        f"{dash['step_s'][switch - 1]:.1f} s |")
    print(f"\nthreads={args.threads}, steps/batch per task: " + ", ".join(
        f"{t}: {v['steps']} x {v['batch_size']}" for t, v in table.items()))
    print("| task | model | run | tokens | loop s | tokens/s | vs Trainer+peft | median step s (no 1st/switch) |\n"
          "|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
