"""Text quality cells: ``apps/train_text.py`` on real models and data (run by ``python -m benchmarks.run``).

- ``minilm``: all-MiniLM-L6-v2 (BERT) classifying Pang & Lee polarity sentences (eval: 1 000 held out);
- ``smollm2``: SmolLM2-135M (LLaMA) on BIG-bench ``social_iqa``, multiple choice by length-normalised
  log-likelihood (eval: 400 held out).

Each method is reported at its own best learning rate of the sweep (the lr with the best mean accuracy over
seeds), mean ± std over seeds, with trainable parameters and the step at which it first reached plain LoRA's
final training loss (loss smoothed over 10 steps).
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from .report import mean_std

TITLE = "Text quality"
METHODS = ["lora", "dash", "lora_init", "tsd", "eva", "lora_da", "pissa", "lora_ga"]
TASKS = {
    "minilm": dict(asset="minilm", data=("polarity", "polarity.csv"), task="classification", eval_split=1000,
                   targets=["query", "key", "value", "dense"], batch=32, max_length=64, warmup=50),
    "smollm2": dict(asset="smollm2-135m", data=("bigbench", "social_iqa/task.json"), task="causal-mc",
                    eval_split=400, max_train_samples=1200,
                    targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], batch=8, max_length=128, warmup=30),
}


def cells(model: str, methods: list[str], *, ranks: list[int], seeds: list[int], lrs: list[float], steps: int,
          eval_examples: int) -> list[dict[str, Any]]:
    return [{"kind": "text", "model": model, "method": m, "rank": r, "lr": lr, "seed": s, "steps": steps,
             "eval_examples": eval_examples}
            for m in methods for r in ranks for lr in lrs for s in seeds]


def train_argv(cfg: dict[str, Any], work: Path) -> list[str]:
    """``apps/train_text.py`` arguments of a text cell (model, data, targets, budget of its ``TASKS`` entry)."""
    from scripts.fetch_assets import require_asset

    spec = TASKS[cfg["model"]]
    data_asset, data_file = spec["data"]
    argv = ["--model_name_or_path", str(require_asset(spec["asset"])), "--task", spec["task"],
            "--train_file", str(require_asset(data_asset) / data_file), "--eval_split", str(spec["eval_split"]),
            "--max_eval_samples", str(cfg["eval_examples"]), "--method", cfg["method"], "--rank", str(cfg["rank"]),
            "--lora_alpha", str(2 * cfg["rank"]), "--target_modules", *spec["targets"],
            "--dash_warmup_steps", str(spec["warmup"]), "--dash_directions", "8", "--learning_rate", str(cfg["lr"]),
            "--max_steps", str(cfg["steps"]), "--per_device_train_batch_size", str(spec["batch"]),
            "--max_length", str(spec["max_length"]), "--seed", str(cfg["seed"]), "--checkpointing_steps", "0",
            "--eval_before", "--no-report_plot", "--output_dir", str(work)]
    if "max_train_samples" in spec:
        argv += ["--max_train_samples", str(spec["max_train_samples"])]
    return argv


def run_cell(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    from accelerate.state import AcceleratorState

    from tsd_text.train import main, parse_args

    AcceleratorState._reset_state(reset_partial_state=True)
    argv = train_argv(cfg, work)
    result = main(parse_args(argv))
    with open(work / "loss_log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    stored = sum(p.stat().st_size for p in work.glob("adapter_model.safetensors"))
    return {"before": result.results["before"], "after": result.results["after"], "train": result.results["train"],
            "loss_curve": losses, "trainable_parameters": sum(p.numel() for p in result.adapter.trainable_parameters()),
            "adapter_file_bytes": stored}


def _smooth(values: list[float], k: int = 10) -> list[float]:
    return [statistics.mean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def report(records: list[dict[str, Any]], out_dir: Path) -> str:
    """Tables (best lr per method, mean ± std over seeds) and a loss-curve plot per model."""
    done = [r for r in records if "result" in r]
    lines = []
    for model in sorted({r["config"]["model"] for r in done}):
        rows = [r for r in done if r["config"]["model"] == model]
        lines += [f"### {model}", "", "| method | rank | best lr | seeds | accuracy before | accuracy after | final loss "
                  "| steps to lora's final loss | trainable params | adapter file |", "|---|---|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple[str, int, float], list[dict[str, Any]]] = {}
        for r in rows:
            c = r["config"]
            groups.setdefault((c["method"], c["rank"], c["lr"]), []).append(r["result"])
        best: dict[tuple[str, int], tuple[float, list[dict[str, Any]]]] = {}
        for (method, rank, lr), rs in groups.items():
            acc = statistics.mean(x["after"]["accuracy"] for x in rs)
            if (method, rank) not in best or acc > statistics.mean(x["after"]["accuracy"] for x in best[(method, rank)][1]):
                best[(method, rank)] = (lr, rs)
        curves = {}
        for (method, rank), (lr, rs) in sorted(best.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
            curves[(method, rank)] = [statistics.mean(v) for v in zip(*[_smooth(x["loss_curve"]) for x in rs])]
        for (method, rank), (lr, rs) in sorted(best.items(), key=lambda kv: (kv[0][1], METHODS.index(kv[0][0]))):
            target = curves.get(("lora", rank), [None])[-1]
            reach = next((i + 1 for i, v in enumerate(curves[(method, rank)]) if target is not None and v <= target), None)
            lines.append(f"| {method} | {rank} | {lr:g} | {len(rs)} | {mean_std([x['before']['accuracy'] for x in rs])} "
                         f"| **{mean_std([x['after']['accuracy'] for x in rs])}** | {mean_std([x['train']['final_loss'] for x in rs])} "
                         f"| {reach if reach is not None else 'not reached'} | {rs[0]['trainable_parameters']:,} "
                         f"| {rs[0]['adapter_file_bytes'] / 1024:.0f} KiB |")
        lines.append("")
        lines.append(f"![loss curves]({_plot(curves, out_dir / f'text_{model}_loss.png', model)})")
        lines.append("")
    return "\n".join(lines)


def _plot(curves: dict[tuple[str, int], list[float]], path: Path, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (method, rank), curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, label=f"{method} r={rank}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (10-step mean, mean over seeds)")
    ax.set_title(f"{title}: each method at its best lr")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
