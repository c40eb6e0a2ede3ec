"""TSD analysis (issue 6, item 2): are task-specific directions few, at moderate σ, and visible early?

Si et al. (arXiv 2409.01035, Sec. 3-4) define the change rate of W's singular directions under the task's
update, δ_i = |u_iᵀ ΔW v_i| / σ_i, and the task-specific directions (TSDs) as its top s. They claim that

1. δ is concentrated: a few directions carry most of it;
2. the TSDs sit at moderate, not top (and not bottom), singular values;
3. LoRA's update after a few steps already predicts them, which is what LoRA-Dash relies on.

One cell (model, seed) measures these on a real model and task (the text cells' ``TASKS``):

- a full fine-tune of the adapted layers and the head for ``reference_steps`` steps gives ΔW* = W_ft - W, the
  paper's definition of the task's update;
- a LoRA run (rank ``rank``) records, at each step t of ``checkpoints``, δ_t of its current update
  (``shared.tsd.delta_sigma`` from its factors) and I_t = top-s(δ_t);
- per layer: overlap@s = |I_t ∩ I_ref| / s against the LoRA run's final update ("final", t = ``checkpoints[-2]``),
  its continuation ("longer", ``checkpoints[-1]``) and the full fine-tune ("full"), with the Spearman correlation
  of δ_t and δ_ref; a random choice of s of k directions overlaps s / k in expectation;
- the concentration of δ (share of Σδ on the top s, against s / k for a flat δ) and the relative rank positions
  (p - 1) / (k - 1) of the TSDs in the σ order (0: largest σ, 1: smallest), for the full fine-tune and LoRA;
- a control for the positions: the same properties of the full fine-tune's top s by |Δσ_i| alone (δ_i σ_i, no
  division by σ_i), which tells whether the TSDs' σ positions come from where the update acts or from the division.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

TITLE = "Task-specific directions: concentration, σ positions, early prediction"
POSITION_BINS = 10  # histogram of relative rank positions, in deciles of the σ order


def cells(models: list[str], seeds: list[int], **settings: Any) -> list[dict[str, Any]]:
    return [{"kind": "tsd", "model": m, "seed": s, **settings} for m in models for s in seeds]


def _train(run: Any, params: list[torch.nn.Parameter], lr: float, steps: int, batch_size: int, seed: int,
           on_step: Any = None) -> list[float]:
    """AdamW at a constant lr (grad-norm clip 1) for ``steps`` optimizer steps; ``on_step(step)`` after each."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    loader = DataLoader(run.data.train, batch_size=batch_size, shuffle=True, collate_fn=run.data.collate_train,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    run.model.train()
    losses: list[float] = []
    with tqdm(total=steps, desc=f"train lr={lr:g}", mininterval=5) as bar:
        while len(losses) < steps:
            for batch in loader:
                loss = run.model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update(1)
                if on_step is not None:
                    on_step(len(losses))
                if len(losses) >= steps:
                    break
    return losses


def _accuracy(run: Any, batch_size: int) -> float:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from tsd_text.train import evaluate

    loader = DataLoader(run.data.eval, batch_size=batch_size, collate_fn=run.data.collate_eval)
    with torch.no_grad():
        return evaluate(Accelerator(cpu=True), run.model, loader, run.data, run.task, "eval")["accuracy"]


def layer_type(name: str) -> str:
    """The name below the block index: "attention.self.query", "output.dense", "self_attn.q_proj", ..."""
    parts = name.split(".")
    last = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[last + 1:])


def relative_positions(indices: torch.Tensor, k: int) -> list[float]:
    """(p - 1) / (k - 1) of 0-based σ-order indices: 0 is the largest singular value, 1 the smallest."""
    return [float(i) / max(k - 1, 1) for i in indices.tolist()]


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a ∩ b| / |a| for two index sets of equal size."""
    return len(set(a.tolist()) & set(b.tolist())) / a.numel()


def run_cell(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from shared import tsd
    from shared.layers import dense_weight
    from tsd_text.classification import spearman
    from tsd_text.train import TextTrainConfig, build_model, parse_args

    from .text_quality import TASKS, train_argv

    spec = TASKS[cfg["model"]]
    s, checkpoints = cfg["directions"], list(cfg["checkpoints"])
    argv = train_argv({**cfg, "method": "lora", "lr": cfg["lora_lr"], "steps": checkpoints[-1]}, work)
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)

    # the full fine-tune: train the frozen base weights of every adapted layer (LoRA B = 0 keeps its branch at
    # zero and untrained), so W_ft - W is the update of exactly the layers LoRA adapts
    torch.manual_seed(cfg["seed"])
    run = build_model(TextTrainConfig.from_args(parse_args(argv)), accelerator)
    adapter = run.adapter
    names = list(adapter.layers)
    svd = {n: (U, S, Vh) for n, U, S, Vh in tsd.iter_svd(names, adapter.original_weight, adapter.dense_shape)}
    original = {n: adapter.original_weight(n).clone() for n in names}  # it reads the base weight the FT changes
    for p in adapter.trainable_parameters():
        p.requires_grad_(False)
    bases = [adapter.layers[n].get_base_layer() for n in names]
    head = [p for n, p in run.model.named_parameters() if "modules_to_save" in n]
    full_params = [m.weight for m in bases] + head
    for p in full_params:
        p.requires_grad_(True)
    acc_before = _accuracy(run, spec["batch"])
    full_losses = _train(run, full_params, cfg["full_lr"], cfg["reference_steps"], spec["batch"], cfg["seed"])
    acc_full = _accuracy(run, spec["batch"])
    full: dict[str, torch.Tensor] = {}
    full_abs_change: dict[str, torch.Tensor] = {}
    for n, m in zip(names, bases, strict=True):
        U, S, Vh = svd[n]
        dW = dense_weight(m).detach().float() - original.pop(n)
        d_sigma = tsd.delta_sigma(U, Vh, dW, torch.eye(Vh.shape[1]))
        full[n], full_abs_change[n] = tsd.change_rate(S, d_sigma), d_sigma.abs()
    del run, adapter, bases, full_params, head

    # the LoRA run, δ_t recorded at each checkpoint from its factors against the same SVDs
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.manual_seed(cfg["seed"])
    run = build_model(TextTrainConfig.from_args(parse_args(argv)), Accelerator(cpu=True))
    adapter = run.adapter
    rates: dict[int, dict[str, torch.Tensor]] = {}

    def record(step: int) -> None:
        if step in checkpoints:
            rates[step] = {}
            for n in names:
                U, S, Vh = svd[n]
                rates[step][n] = tsd.change_rate(S, tsd.delta_sigma(U, Vh, *adapter.update_factors(n)))

    lora_losses = _train(run, adapter.trainable_parameters(), cfg["lora_lr"], checkpoints[-1], spec["batch"],
                         cfg["seed"], record)
    acc_lora = _accuracy(run, spec["batch"])

    top = lambda rate: tsd.select_directions(rate, s)  # noqa: E731
    refs = {"final": rates[checkpoints[-2]], "longer": rates[checkpoints[-1]], "full": full}
    by_t = []
    for t in checkpoints:
        row: dict[str, Any] = {"t": t}
        for ref_name, ref in refs.items():
            row[f"overlap_{ref_name}"] = statistics.mean(overlap(top(rates[t][n]), top(ref[n])) for n in names)
            row[f"spearman_{ref_name}"] = statistics.mean(spearman(rates[t][n], ref[n]) for n in names)
        row["overlap_full_by_type"] = {
            ty: statistics.mean(overlap(top(rates[t][n]), top(full[n])) for n in names if layer_type(n) == ty)
            for ty in sorted({layer_type(n) for n in names})}
        by_t.append(row)

    def properties(rate_of: dict[str, torch.Tensor]) -> dict[str, Any]:
        positions = [p for n in names for p in relative_positions(top(rate_of[n]), rate_of[n].numel())]
        hist = torch.histc(torch.tensor(positions), bins=POSITION_BINS, min=0.0, max=1.0)
        return {"top_s_mass": statistics.mean(float(r[top(r)].sum() / r.sum()) for r in rate_of.values()),
                "flat_top_s_mass": statistics.mean(s / r.numel() for r in rate_of.values()),
                "median_relative_position": statistics.median(positions),
                "share_in_top_decile": float(hist[0] / hist.sum()),
                "share_in_bottom_decile": float(hist[-1] / hist.sum()),
                "position_histogram": hist.tolist()}

    return {"layers": len(names), "k": sorted({int(svd[n][1].numel()) for n in names}),
            "random_overlap": statistics.mean(s / svd[n][1].numel() for n in names),
            "accuracy": {"base": acc_before, "full": acc_full, "lora": acc_lora},
            "final_loss": {"full": statistics.mean(full_losses[-10:]), "lora": statistics.mean(lora_losses[-10:])},
            "by_t": by_t, "full": properties(full), "lora_final": properties(refs["final"]),
            "full_by_abs_change": properties(full_abs_change)}


def report(records: list[dict[str, Any]], out_dir: Path) -> str:
    """Overlap@s vs t and the concentration / position properties, mean ± std over seeds, with plots."""
    from .report import mean_std

    done = [r for r in records if "result" in r]
    lines: list[str] = []
    for model in sorted({r["config"]["model"] for r in done}):
        rs = [r["result"] for r in done if r["config"]["model"] == model]
        c = next(r["config"] for r in done if r["config"]["model"] == model)
        lines += [f"### {model}: {rs[0]['layers']} adapted layers (k = {rs[0]['k']}), s = {c['directions']}, "
                  f"{len(rs)} seed(s)", "",
                  f"LoRA r={c['rank']} at lr {c['lora_lr']:g}; full fine-tune of the same layers and the head at lr "
                  f"{c['full_lr']:g} for {c['reference_steps']} steps. "
                  f"Accuracy: base {mean_std([x['accuracy']['base'] for x in rs])}, "
                  f"LoRA {mean_std([x['accuracy']['lora'] for x in rs])}, "
                  f"full {mean_std([x['accuracy']['full'] for x in rs])}.", "",
                  f"Overlap@s of LoRA's TSDs at step t with the reference TSDs (a random choice: "
                  f"{statistics.mean(x['random_overlap'] for x in rs):.3f}):", "",
                  "| t | vs LoRA final | vs LoRA longer | vs full FT | Spearman δ vs full FT |",
                  "|---|---|---|---|---|"]
        for i, t in enumerate(c["checkpoints"]):
            get = lambda key, i=i, rs=rs: [x["by_t"][i][key] for x in rs]  # noqa: E731
            lines.append(f"| {t} | {mean_std(get('overlap_final'))} | {mean_std(get('overlap_longer'))} "
                         f"| {mean_std(get('overlap_full'))} | {mean_std(get('spearman_full'))} |")
        lines += ["", "| update | top-s share of Σδ | same for a flat δ | median relative σ position of TSDs "
                  "| TSDs in top σ decile | in bottom decile |", "|---|---|---|---|---|---|"]
        for key, label in (("full", "full fine-tune"), ("lora_final", "LoRA final"),
                           ("full_by_abs_change", "control: full fine-tune, top s by \\|Δσ\\| (no ÷ σ)")):
            has = [x for x in rs if key in x]  # the control was added after the first minilm seed had run
            if not has:
                continue
            get = lambda k, key=key, has=has: [x[key][k] for x in has]  # noqa: E731
            label += f", {len(has)} seed(s)" if len(has) < len(rs) else ""
            lines.append(f"| {label} | {mean_std(get('top_s_mass'))} | {mean_std(get('flat_top_s_mass'))} "
                         f"| {mean_std(get('median_relative_position'))} | {mean_std(get('share_in_top_decile'))} "
                         f"| {mean_std(get('share_in_bottom_decile'))} |")
        lines += ["", f"![TSD analysis]({_plot(model, c, rs, out_dir / f'tsd_{model}.png')})", ""]
    return "\n".join(lines)


def _plot(model: str, cfg: dict[str, Any], rs: list[dict[str, Any]], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ts = cfg["checkpoints"]
    for ref in ("final", "longer", "full"):
        ax1.plot(ts, [statistics.mean(x["by_t"][i][f"overlap_{ref}"] for x in rs) for i in range(len(ts))],
                 marker="o", label=f"vs {ref}")
    ax1.axhline(statistics.mean(x["random_overlap"] for x in rs), color="gray", ls=":", label="random")
    ax1.set_xscale("log")
    ax1.set_xlabel("LoRA step t")
    ax1.set_ylabel("overlap@s")
    ax1.legend(fontsize=7)
    edges = [(i + 0.5) / POSITION_BINS for i in range(POSITION_BINS)]
    for key, label in (("full", "full fine-tune"), ("lora_final", "LoRA final"),
                       ("full_by_abs_change", "control: full FT, top s by |Δσ|")):
        if not any(key in x for x in rs):
            continue
        hist = [statistics.mean(x[key]["position_histogram"][i] for x in rs if key in x) for i in range(POSITION_BINS)]
        ax2.plot(edges, [h / sum(hist) for h in hist], marker="o", label=label)
    ax2.axhline(1 / POSITION_BINS, color="gray", ls=":", label="uniform")
    ax2.set_xlabel("relative position in the σ order (0 = largest σ)")
    ax2.set_ylabel("share of TSDs")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{model}: task-specific directions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
