"""The LoRA-Dash paper's commonsense protocol at our scale: SmolLM2-135M trained on a mixture of the eight tasks
(run by ``python -m benchmarks.run``).

A cell trains ``apps/train_text.py`` on ``--train_file commonsense:all`` (the train splits of BoolQ, PIQA, SIQA,
HellaSwag, WinoGrande, ARC-e, ARC-c and OBQA from the ``commonsense`` asset), ``train_examples`` of them shared evenly
among the tasks (one epoch: steps × batch 8), and scores ``eval_per_task`` items of each task's validation split by
length-normalised log-likelihood (``--eval_mode loglik``, the trainer's default, with the ``question`` prompt): one
accuracy per task and their mean, the paper's "Avg". The paper evaluates by generation instead (LLM-Adapters'
instruction format, the answer read off 32 generated tokens; ``--eval_mode generate``): on a 135M model after a few
hundred steps generation mostly produces no parseable answer and costs several times the CPU time, so the grid
scores the choices, which measures what the model learned rather than whether it learned the answer format. The
seed draws both the training sample and the evaluation items, so every method at one seed sees the same items.

The recipe follows the paper's where it can: targets q, k, v, up and down projections, alpha = 2r, dropout 0.05,
AdamW, linear decay, s = 8 directions; t (the dash switch) is a fifth of the steps, since the run is short. The
grid: lora, dash, lora_init, tsd, eva, lora_da, pissa and lora_ga at r = 4 and 16, lora also at 32, and dash with
λ's own learning rate at 10 and 100 times the base lr (``--dash_lr_ratio``: does dash help when λ can move?); each
row in the two stages of :func:`benchmarks.text_quality.grid`: an lr sweep at seed 0, then 3 seeds at its best lr.
Every row is compared with lora at the same rank by the suite's paired rule (:mod:`benchmarks.claims`). Next to the
table stand the paper's LLaMA numbers for the rows it has, which are theirs, at 7-8B parameters and full data.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import text_quality
from .claims import paired_verdict
from .report import mean_std

TITLE = "The commonsense protocol (the paper's eight tasks)"
#: the eight tasks in the order of the paper's table, with its column names
TASK_COLUMNS = {"boolq": "BoolQ", "piqa": "PIQA", "socialiqa": "SIQA", "hellaswag": "HellaS.", "winogrande": "WinoG.",
                "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
METHODS = ["lora", "dash", "lora_init", "tsd", "eva", "lora_da", "pissa", "lora_ga"]
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
BATCH, MAX_LENGTH, DROPOUT, DIRECTIONS = 8, 256, 0.05, 8
#: Si et al., "Unleashing the Power of Task-Specific Directions in Parameter Efficient Fine-tuning" (ICLR 2025,
#: arXiv 2409.01035), commonsense table, accuracy % as the authors list it in their repository
#: (github.com/Chongjie-Si/Subspace-Tuning, Fair_Comparison/README.md): (base model, method, rank) -> the eight tasks
#: in :data:`TASK_COLUMNS` order and their average. LLaMA-7B rows are trained on commonsense_170k for 3 epochs,
#: scored by generation. Only the rows our grid also has; the table has no LoRA-Init, LoRA-TSD, EVA, LoRA-DA or
#: LoRA-GA rows, and PiSSA only at r = 32 on LLaMA3-8B.
PAPER = {
    ("LLaMA-7B", "lora", 4): (2.3, 46.1, 18.3, 19.7, 55.2, 65.4, 51.9, 57.0, 39.5),
    ("LLaMA-7B", "dash", 4): (65.2, 79.9, 78.3, 82.8, 77.1, 78.6, 65.4, 78.4, 75.7),
    ("LLaMA-7B", "lora", 32): (68.9, 80.7, 77.4, 78.1, 78.8, 77.8, 61.3, 74.8, 74.7),
    ("LLaMA3-8B", "lora", 16): (72.3, 86.7, 79.3, 93.5, 84.8, 87.7, 75.7, 82.8, 82.8),
    ("LLaMA3-8B", "dash", 16): (74.8, 88.0, 80.6, 95.2, 85.6, 89.0, 77.4, 84.8, 84.4),
    ("LLaMA3-8B", "lora", 32): (70.8, 85.2, 79.9, 91.7, 84.3, 84.2, 71.2, 79.0, 80.8),
}


def _cell(method: str, rank: int, ratio: float, lr: float, seed: int, budget: dict[str, int]) -> dict[str, Any]:
    # the untrained base is scored once per seed, by lora at the smallest rank (B = 0: its model is the base)
    return {"kind": "commonsense", "model": "smollm2", "method": method, "rank": rank, "dash_lr_ratio": ratio,
            "lr": lr, "seed": seed, **budget, "eval_before": method == "lora" and rank == 4}


def cells(*, ranks: list[int], seeds: list[int], lrs: list[float], steps: int, eval_per_task: int,
          methods: Sequence[str] = METHODS, dash_lr_ratios: Sequence[float] = (10, 100),
          extra_ranks: dict[str, list[int]] | None = None, done: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The grid (module docstring), in :func:`benchmarks.text_quality.grid`'s two stages: every method at ``ranks``
    (plus a method's ``extra_ranks``), dash also at each of ``dash_lr_ratios``; ``steps × 8`` training examples."""
    budget = {"steps": steps, "train_examples": steps * BATCH, "eval_per_task": eval_per_task}
    done = [r for r in done if r["config"]["kind"] == "commonsense"
            and all(r["config"].get(k) == v for k, v in budget.items())]
    ratio_of: dict[str, tuple[str, float]] = {}
    arms: dict[str, list[int]] = {}
    for method in methods:
        for ratio in [1, *(dash_lr_ratios if method == "dash" else [])]:
            name = text_quality.arm({"method": method, "dash_lr_ratio": ratio})
            ratio_of[name] = (method, ratio)
            arms[name] = [*ranks, *(extra_ranks or {}).get(method, [])] if ratio == 1 else list(ranks)
    return text_quality.grid(
        arms, seeds=seeds, lrs=lrs, make=lambda a, r, lr, seed: _cell(ratio_of[a][0], r, ratio_of[a][1], lr, seed,
                                                                      budget),
        best=lambda a, r: text_quality.best_lr(done, "smollm2", a, r, seeds[0], lrs, kind="commonsense"))


def train_argv(cfg: dict[str, Any], work: Path) -> list[str]:
    """``apps/train_text.py`` arguments of a commonsense cell."""
    from tsd_common.assets import require_asset

    steps = cfg["steps"]
    return ["--model_name_or_path", str(require_asset("smollm2")), "--task", "causal-mc",
            "--train_file", "commonsense:all", "--eval_file", "commonsense:all",
            "--max_train_samples", str(cfg["train_examples"]),
            "--max_eval_samples", str(cfg["eval_per_task"] * len(TASK_COLUMNS)),
            "--method", cfg["method"], "--rank", str(cfg["rank"]), "--lora_alpha", str(2 * cfg["rank"]),
            "--lora_dropout", str(DROPOUT), "--target_modules", *TARGETS, "--dash_warmup_steps", str(steps // 5),
            "--dash_directions", str(DIRECTIONS), "--dash_lr_ratio", str(cfg["dash_lr_ratio"]),
            "--learning_rate", str(cfg["lr"]), "--max_steps", str(steps), "--per_device_train_batch_size", str(BATCH),
            "--max_length", str(MAX_LENGTH), "--seed", str(cfg["seed"]), "--checkpointing_steps", "0",
            "--eval_before" if cfg["eval_before"] else "--no-eval_before", "--no-report_plot", "--output_dir",
            str(work)]


def run_cell(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    import csv

    from accelerate.state import AcceleratorState

    from tsd_text.train import main, parse_args

    AcceleratorState._reset_state(reset_partial_state=True)
    result = main(parse_args(train_argv(cfg, work)))
    with open(work / "loss_log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    return {"before": result.results["before"], "after": result.results["after"], "train": result.results["train"],
            "loss_curve": losses, "trainable_parameters": sum(p.numel() for p in result.adapter.trainable_parameters()),
            **({"dash_scale": text_quality.dash_scale(result.adapter)} if result.adapter.switched else {})}


def _task_cells(results: list[dict[str, Any]], key: str = "after") -> list[str]:
    """Mean ± std over ``results`` of each task's accuracy and the average, in percent as the paper prints them."""
    cols = [f"accuracy/{t}" for t in TASK_COLUMNS] + ["accuracy"]
    return [mean_std([100 * x[key][c] for x in results], 1) for c in cols]


def report(records: list[dict[str, Any]], out_dir: Path) -> str:
    """The lr sweep, the per-task table at each row's best lr with the paired verdict against lora at the same
    rank, and the paper's LLaMA numbers for the same rows."""
    rows = [r for r in records if "result" in r]
    if not rows:
        return "No cell has finished yet."
    chosen, groups = text_quality.at_best_lr(rows)
    head = "| " + " | ".join(TASK_COLUMNS.values()) + " | Avg |"
    lines = [*text_quality.sweep_lines(rows, chosen), "",
             "Accuracy (%) per task and their mean (Avg), mean ± std over seeds at each row's best lr; Avg − lora's "
             "pairs each seed with lora's run at the same rank and seed (which saw the same training and evaluation "
             "items), and the verdict follows the suite's rule.", "",
             "| method | rank | lr | seeds " + head + " Avg − lora's (paired) | verdict vs lora |",
             "|---|---|---|---" + "|---" * (len(TASK_COLUMNS) + 3) + "|"]
    base = [{"after": r["result"]["before"]} for r in rows if r["result"].get("before")
            and r["config"]["seed"] == min(x["config"]["seed"] for x in rows)]
    if base:
        lines.append("| untrained base | – | – | – | " + " | ".join(_task_cells(base[:1])) + " | – | – |")
    for (arm, rank), rs in groups.items():
        lora = {x["seed"]: x["after"]["accuracy"] for x in groups.get(("lora", rank), [])}
        diffs = [100 * (x["after"]["accuracy"] - lora[x["seed"]]) for x in rs if x["seed"] in lora]
        paired = ("–", "–") if arm == "lora" else (mean_std(diffs, 1), paired_verdict(diffs) if diffs else "–")
        lines.append(f"| {arm} | {rank} | {chosen[(arm, rank)]:g} | {len(rs)} | " + " | ".join(_task_cells(rs))
                     + f" | {paired[0]} | {paired[1]} |")
    n = {t: statistics.mean(r["result"]["after"][f"num_examples/{t}"] for r in rows) for t in TASK_COLUMNS}
    lines += ["", f"Evaluation items per task: {', '.join(f'{TASK_COLUMNS[t]} {v:g}' for t, v in n.items())}; chance "
              "is 50 % for BoolQ, PIQA and WinoGrande, 33 % for SIQA, 25 % for the rest (HellaSwag, ARC, OBQA)."]
    ours = {(m, rank) for m, rank in groups}
    theirs = [(k, v) for k, v in PAPER.items() if (k[1], k[2]) in ours]
    if theirs:
        lines += ["", "The paper's numbers for the same rows (**theirs, not ours**: LLaMA-7B and LLaMA3-8B trained on "
                  "170 k commonsense examples for 3 epochs and scored by generation; Si et al., arXiv 2409.01035, "
                  "as the authors' repository lists them):", "",
                  "| their base model | method | rank " + head, "|---|---|---" + "|---" * (len(TASK_COLUMNS) + 1) + "|"]
        lines += [f"| {model} | {m} | {rank} | " + " | ".join(f"{v:.1f}" for v in values) + " |"
                  for (model, m, rank), values in theirs]
    return "\n".join(lines)
