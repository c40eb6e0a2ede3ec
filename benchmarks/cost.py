"""Cost cells: what every method of the core costs next to plain peft LoRA, on CPU (run by
``python -m benchmarks.run``).

One cell is one model of :mod:`benchmarks.overhead` (``llama``: its small random LLaMA; ``minilm``: the real
all-MiniLM-L6-v2 with a 2-label head, skipped with the reason when absent) at its settings (r=8, alpha=16,
s=8 directions, switch at t=2, batch 8 x 64, AdamW, dropout 0), methods ``peft`` and every one of
``shared.METHODS``. The data-driven inits read the model's batch function (``overhead.InitData``) through
``model(**batch).loss``; the cell's ``init`` (``AdapterConfig`` fields such as ``eva_max_batches``,
``lora_init_steps``, ``lora_ga_batches``, ``lora_da_num_samples``) sets how much data they read. Everything runs
in one process, so every ratio pairs measurements of the same run:

1. **init, switch, step** (``overhead.time_attaches``, then ``overhead.time_runners``): ``attaches`` fresh
   attaches per method, methods rotating. Init time = wall time of ``get_peft_model`` / ``shared.attach`` with
   the data statistics of a data-driven init (median); for dash and tsd the ``adapter.step`` call that switches
   (median, and in units of peft's median step). The last attach's models then train side by side: step time
   (forward, backward, AdamW step, zero_grad, ``adapter.step``; dash and tsd after their switch) is the median over
   ``repeats`` x ``steps`` interleaved rounds of one step per method, each against peft's (ratio of medians, and
   the median of the per-round ratios). Trainable parameters are counted on the same models.
2. **peak RSS extra** (``overhead.measure_memory``): per method a fresh subprocess attaches in place and trains
   ``memory_steps`` steps; peak RSS minus RSS before the attach (psutil sampling), the init phase on its own.
3. **exported files**: after the timing, the bytes of the safetensors that ``shared.export_lora`` writes in the
   portable ``peft`` format (dash/tsd folded to rank r+s, residualised inits to 2r) and the native ``tsd`` format,
   against the file of peft's own ``save_pretrained``.
4. **our EVA vs peft's EVA** on the same base, the same batches (``init["eva_max_batches"]`` of them), the same
   tau / rho and the same randomized-SVD seed (peft's fixed 42): ``shared.attach(method="eva")`` against
   ``peft.get_peft_model(LoraConfig(init_lora_weights="eva",
   eva_config=EvaConfig(rho, tau)))`` + ``peft.initialize_lora_eva_weights``. Both select the same rows (attention
   mask, and labels != -100 only for token-level labels: ``shared.statistics.token_mask``), passed to peft as its
   ``prepare_*_inputs_fn``. peft's loop has no batch cap; at ours (after the same number of forwards) its
   remaining layers are marked converged, which is what our cap does (use the components as they are, warn).
   Layers that see fewer rows per batch than round(rho r) components (a pooler: one row per sequence) are left
   out of both, since peft's EVA never fits them and never ends. Reported: init wall time of both, forwards, the
   per-layer ranks (agreement: share of layers with the same rank) and the subspace agreement of the A matrices
   per layer, the mean squared cosine of the principal angles between the row spaces, ‖Q_ours Q_peftᵀ‖_F² / min(r).

The CPU share that other processes took is measured for every timed unit (``overhead.ContentionGuard``: with
``idle_wait`` > 0 a contended unit is re-run after waiting, within ``idle_budget`` seconds) and reported.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shared

from . import overhead

TITLE = "Cost of every method next to plain peft LoRA"
METHODS = ("peft", *shared.METHODS)
EXPORT_FORMATS = ("peft", "tsd")
PEFT_EVA_SEED = 42  # the randomized-SVD seed of peft's EVA hooks (SVDHook's IncrementalPCA lowrank_seed)
DEFAULTS: dict[str, Any] = {
    "repeats": 3, "steps": 10, "warmup": 2, "attaches": 3, "memory_steps": 4, "threads": 2,
    "init": {"lora_init_steps": 20, "eva_max_batches": 16, "lora_ga_batches": 8, "lora_da_num_samples": 64},
    "contention": 0.10, "idle_wait": 30.0, "idle_budget": 120.0,
}


def cells(models: list[str], **settings: Any) -> list[dict[str, Any]]:
    """One cost cell per model; ``settings`` override :data:`DEFAULTS` (every setting is in the config)."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown cost cell setting(s): {', '.join(unknown)}")
    return [{"kind": "cost", "model": m, **DEFAULTS, **settings} for m in models]


def run_cell(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Measure one cost cell (see the module docstring); exports go to ``work``. SkipCell when the model is absent."""
    from .subject_study import SkipCell

    if 0 < cfg["memory_steps"] < overhead.T:
        raise ValueError(f"memory_steps must be 0 (no probe) or >= t = {overhead.T} (dash and tsd switch at t)")
    torch.set_num_threads(cfg["threads"])
    specs, skipped = overhead.model_specs([cfg["model"]])
    if not specs:
        raise SkipCell(skipped[cfg["model"]])
    spec, init = specs[0], cfg["init"]
    guard = overhead.ContentionGuard(cfg["contention"], cfg["idle_wait"], cfg["idle_budget"])
    base = spec.build()
    batch = spec.batch(base, 0)
    for m in ("peft", "lora"):  # the process's one-time costs (lazy imports, first calls) are no method's init
        overhead.Runner(base, m, spec.targets)
    attach, runners = overhead.time_attaches(spec, base, batch, METHODS, cfg["attaches"], guard, init)
    timing = overhead.time_runners(spec, runners, batch, cfg["repeats"], cfg["steps"], cfg["warmup"], guard)
    layers = {m: len(r.lora_layer_names()) for m, r in runners.items()}
    exports = export_sizes(runners, work / "exports")
    del runners
    eva = compare_eva(spec, base, init, guard)
    del base
    memory = (overhead.measure_memory(spec, cfg["memory_steps"], METHODS, init, cfg["threads"])
              if cfg["memory_steps"] > 0 else {})

    peft_init, peft_step = attach["peft"]["init"]["median_ms"], timing["methods"]["peft"]["median_step_ms"]
    summary = {}
    for m in METHODS:
        t = timing["methods"][m]
        sw = attach[m].get("switch")
        summary[m] = {
            "init_ms": attach[m]["init"]["median_ms"], "init_ratio": attach[m]["init"]["median_ms"] / peft_init,
            "switch_ms": sw["median_ms"] if sw else None,
            "switch_in_peft_steps": sw["median_ms"] / peft_step if sw else None,
            "step_ms": t["median_step_ms"], "step_ratio": 1.0 if m == "peft" else t["ratio_vs_peft"],
            "step_ratio_paired": 1.0 if m == "peft" else t["ratio_vs_peft_paired_median"],
            "trainable_params": t["trainable_params"], "lora_layers": layers[m],
            "rss_extra_mb": memory.get(m, {}).get("sampled_extra_mb"),
            "init_rss_extra_mb": memory.get(m, {}).get("phase_peak_extra_mb", {}).get("attach"),
            "export_bytes": exports[m],
            "export_ratio": {f: b / exports["peft"]["peft"] for f, b in exports[m].items()},
        }
    shares = [s for a in attach.values() for s in a["init"]["foreign_cpu_share"]]  # one per attach unit
    contention = {
        "threshold": guard.threshold, "guard": guard.report(),
        "attach_units": len(shares), "attach_contended": sum(s >= guard.threshold for s in shares),
        "attach_share_max": max(shares),
        "step_rounds": timing["units"], "step_rounds_contended": timing["contended_units"],
        "step_share_max": timing["foreign_cpu_share_max"], "eva_shares": eva["foreign_cpu_share"],
    }
    skipped_parts = {}
    if not memory:
        skipped_parts["peak RSS"] = "memory probe off (memory_steps = 0)"
    skipped_parts.update({m: f"memory probe failed: {r['error'][-300:]}" for m, r in memory.items() if "error" in r})
    return {"description": spec.description, "summary": summary, "eva": eva, "contention": contention,
            "skipped": skipped_parts, "attach": attach, "timing": timing, "memory": memory,
            "settings": {"r": overhead.R, "alpha": overhead.ALPHA, "dash_directions": overhead.S,
                         "dash_warmup_steps": overhead.T, "batch": overhead.BATCH, "seq": overhead.SEQ,
                         "threads": torch.get_num_threads()}}


def _safetensors_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def export_sizes(runners: dict[str, overhead.Runner], out: Path) -> dict[str, dict[str, int]]:
    """Bytes of the safetensors written per method and format: ``save_pretrained`` for peft, else
    ``shared.export_lora`` in each of :data:`EXPORT_FORMATS`."""
    sizes = {}
    for m, runner in runners.items():
        if runner.adapter is None:
            runner.model.save_pretrained(out / m / "peft")
            sizes[m] = {"peft": _safetensors_bytes(out / m / "peft")}
        else:
            sizes[m] = {f: _safetensors_bytes(shared.export_lora(runner.adapter, out / m / f, format=f))
                        for f in EXPORT_FORMATS}
    return sizes


# ---------------------------------------------------------------------------------------------- EVA vs peft's EVA
def eva_layers(model: nn.Module, targets: list[str], batch: dict[str, torch.Tensor], components: int
               ) -> tuple[list[str], dict[str, str]]:
    """Target layers that see at least ``components`` input rows per batch, and why the others are left out."""
    from shared.layers import find_targets

    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in find_targets(model, targets).items()]
    try:
        with torch.no_grad():
            overhead.loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    rows = {n: int(torch.tensor(s[:-1]).prod()) for n, s in shapes.items()}
    keep = sorted(n for n, k in rows.items() if k >= components)
    return keep, {n: f"{k} input rows per batch < {components} components" for n, k in rows.items() if k < components}


def subspace_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of ``a`` and ``b`` (1: same space)."""
    qa, qb = torch.linalg.qr(a.double().T).Q, torch.linalg.qr(b.double().T).Q
    return float((qa.T @ qb).pow(2).sum()) / min(a.shape[0], b.shape[0])


def compare_eva(spec: overhead.ModelSpec, base: nn.Module, init: dict[str, Any], guard: overhead.ContentionGuard
                ) -> dict[str, Any]:
    """Our EVA and peft's on the same base, batches, tau and rho: init time, forwards, ranks, subspaces."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.eva import SVDHook

    from shared.statistics import masked_rows, shared_input_groups, token_mask

    cfg = overhead.adapter_config("eva", spec.targets, init)
    batches = list(itertools.islice(overhead.InitData(spec, base), cfg.eva_max_batches))
    label_mask = batches[0]["labels"].dim() == 2  # token-level labels (LM); a classifier's are one per sequence
    components = round(cfg.eva_rho * cfg.r)
    names, excluded = eva_layers(base, spec.targets, batches[0], components)
    cfg = overhead.adapter_config("eva", names, {**init, "eva_use_label_mask": label_mask, "seed": PEFT_EVA_SEED})
    cap = 1 + cfg.eva_max_batches  # both: one probe forward (shared inputs / hashes), then at most the cap

    def ours() -> tuple[dict[str, torch.Tensor], int, bool, float]:
        model, calls = copy.deepcopy(base), [0]

        def forward(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
            calls[0] += 1
            return overhead.loss_fn(m, b)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            adapter = shared.attach(model, cfg, data=batches, forward_fn=forward, progress=False)
            dt = time.perf_counter() - t0
        capped = any("EVA stopped at the cap" in str(w.message) for w in caught)
        return {n: adapter.lora_factors(n)[1].detach() for n in adapter.layers}, calls[0], capped, dt

    def peft() -> tuple[dict[str, torch.Tensor], int, bool, float]:
        model, calls = copy.deepcopy(base), [0]

        def forward(m: nn.Module, b: dict[str, torch.Tensor]) -> Any:
            calls[0] += 1
            if calls[0] <= cap:
                return m(**b)
            for mod in m.modules():  # our cap: the layers still open keep their components as they are
                for hook in mod._forward_hooks.values():
                    if isinstance(hook, SVDHook):
                        hook.converged = torch.ones_like(hook.converged)
            return None

        lcfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=names,
                          init_lora_weights="eva",
                          eva_config=EvaConfig(rho=cfg.eva_rho, tau=cfg.eva_tau, use_label_mask=label_mask))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*low_cpu_mem_usage.*")
            t0 = time.perf_counter()
            pm = get_peft_model(model, lcfg)
            initialize_lora_eva_weights(
                pm, dataloader=batches, forward_fn=forward, show_progress_bar=False,
                prepare_model_inputs_fn=lambda inputs, _: token_mask(inputs, label_mask),
                prepare_layer_inputs_fn=lambda x, mask, _: masked_rows(x[0] if isinstance(x, (tuple, list)) else x,
                                                                       mask))
            dt = time.perf_counter() - t0
        A = {n.removeprefix("base_model.model."): mod.lora_A["default"].weight.detach()
             for n, mod in pm.named_modules() if isinstance(mod, LoraLayer)}
        return A, min(calls[0], cap), calls[0] > cap, dt

    guard.wait()
    (a_ours, f_ours, capped_ours, t_ours), share_ours = guard.run(ours)
    guard.wait()
    (a_peft, f_peft, capped_peft, t_peft), share_peft = guard.run(peft)
    ranks = {n: [a_ours[n].shape[0] if n in a_ours else 0, a_peft[n].shape[0] if n in a_peft else 0] for n in names}
    # layers with one input (q/k/v) pool identical variance ratios, so the last slots of the budget can fall on
    # ties, which each side breaks its own way: within such a group, compare the ranks as multisets
    groups = shared_input_groups(base, {n: base.get_submodule(n) for n in names}, batches[0], overhead.loss_fn)
    same_up_to_ties = sum(sum((Counter(ranks[n][0] for n in g) & Counter(ranks[n][1] for n in g)).values())
                          for g in groups)
    both = [n for n, (ro, rp) in ranks.items() if ro and rp]
    sub = {n: subspace_agreement(a_ours[n], a_peft[n]) for n in both}
    return {"tau": cfg.eva_tau, "rho": cfg.eva_rho, "max_batches": cfg.eva_max_batches, "use_label_mask": label_mask,
            "layers": len(names), "excluded": excluded,
            "ours": {"init_ms": 1e3 * t_ours, "forwards": f_ours, "hit_cap": capped_ours,
                     "rank_sum": sum(r for r, _ in ranks.values())},
            "peft": {"init_ms": 1e3 * t_peft, "forwards": f_peft, "hit_cap": capped_peft,
                     "rank_sum": sum(r for _, r in ranks.values())},
            "init_ratio_ours_vs_peft": t_ours / t_peft,
            "ranks": ranks, "rank_agreement": sum(ro == rp for ro, rp in ranks.values()) / len(ranks),
            "ranks_equal_up_to_ties": same_up_to_ties / len(ranks),
            "subspace_agreement": statistics.mean(sub.values()) if sub else None,
            "subspace_agreement_min": min(sub.values()) if sub else None, "subspace_per_layer": sub,
            "foreign_cpu_share": [share_ours, share_peft]}


# ---------------------------------------------------------------------------------------------- report
def report(records: list[dict[str, Any]], out_dir: Path) -> str:
    """Per model: the cost table against peft, the EVA comparison, contention and what was skipped, a plot."""
    done = sorted((r for r in records if "result" in r), key=lambda r: r["config"]["model"])
    lines: list[str] = []
    for rec in done:
        c, res = rec["config"], rec["result"]
        s, st, model = res["summary"], res["settings"], c["model"]
        lines += [f"### {model}: {res['description']}", "",
                  f"r={st['r']}, alpha={st['alpha']:g}, s={st['dash_directions']}, "
                  f"switch at t={st['dash_warmup_steps']}, "
                  f"batch {st['batch']} x {st['seq']}, {st['threads']} thread(s); init and switch: median of "
                  f"{c['attaches']} fresh attaches; step: median of {c['repeats']} x {c['steps']} interleaved rounds "
                  f"(dash/tsd after the switch); data-driven inits with "
                  + ", ".join(f"{k}={v}" for k, v in sorted(c["init"].items())) + ".", "",
                  "| method | layers | init (ms) | init / peft | switch (ms) | switch / peft step | step (ms) "
                  "| step / peft (medians / paired) | trainable params | peak RSS extra (MiB) | peak at init (MiB) "
                  "| peft-format file (KiB) | / peft's | native tsd file (KiB) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in METHODS:
            x = s[m]
            lines.append(
                f"| {m} | {x['lora_layers']} | {x['init_ms']:.1f} | {_ratio(x['init_ratio'], m)} "
                f"| {_num(x['switch_ms'], '.1f')} "
                f"| {_num(x['switch_in_peft_steps'], '.1f')} | {x['step_ms']:.2f} "
                f"| {_ratio(x['step_ratio'], m, '.3f')}" + ("" if m == "peft" else f" / {x['step_ratio_paired']:.3f}")
                + f" | {x['trainable_params']:,} | {_num(x['rss_extra_mb'], '.1f')} "
                f"| {_num(x['init_rss_extra_mb'], '.1f')} "
                f"| {x['export_bytes']['peft'] / 1024:.1f} | {_ratio(x['export_ratio']['peft'], m, '.2f')} "
                f"| {_num(x['export_bytes'].get('tsd'), '.1f', 1 / 1024)} |")
        e = res["eva"]
        lines += ["", f"EVA, ours vs peft's ({e['layers']} layers, tau={e['tau']:g}, rho={e['rho']:g}, the same "
                  f"{e['max_batches']} batches, label mask {'on' if e['use_label_mask'] else 'off'}):", "",
                  "| | init (ms) | forwards | stopped at the cap | rank sum |", "|---|---:|---:|---|---:|"]
        for side in ("ours", "peft"):
            x = e[side]
            lines.append(f"| {side} | {x['init_ms']:.0f} | {x['forwards']} "
                         f"| {'yes' if x['hit_cap'] else 'no (converged)'} | {x['rank_sum']} |")
        sub = e["subspace_agreement"]
        differ = [f"{n} {ro} vs {rp}" for n, (ro, rp) in e["ranks"].items() if ro != rp]
        lines += ["", f"- init time ours / peft's: **{e['init_ratio_ours_vs_peft']:.2f}**; layers with the same rank: "
                  f"**{e['rank_agreement']:.3f}**"
                  + (f" (ours vs peft's: {'; '.join(differ)})" if differ else "")
                  + "; subspace agreement of A (mean squared cosine of the principal angles, 1 = the same row space): "
                  + (f"**{sub:.3f}** mean, {e['subspace_agreement_min']:.3f} worst layer" if sub is not None
                     else "no layer got a rank on both sides")]
        k = res["contention"]
        g = k["guard"]
        lines.append(f"- contention (other processes >= {100 * k['threshold']:.0f}% of the CPUs): "
                     f"{k['attach_contended']} of {k['attach_units']} attach units "
                     f"(max {100 * k['attach_share_max']:.0f}%), "
                     f"{k['step_rounds_contended']} of {k['step_rounds']} step rounds "
                     f"(max {100 * k['step_share_max']:.0f}%), "
                     f"EVA runs {', '.join(f'{100 * x:.0f}%' for x in k['eva_shares'])}; "
                     f"{g['discarded_units']} units re-run, "
                     f"{g['waited_s']:.0f} s waited"
                     + (" -- contended: rerun on an idle machine for trustworthy times"
                        if k["attach_contended"] + k["step_rounds_contended"]
                        > 0.1 * (k["attach_units"] + k["step_rounds"])
                        else ""))
        skipped = {**res["skipped"], **{f"EVA comparison, {n}": why for n, why in e["excluded"].items()}}
        for what, why in skipped.items():
            lines.append(f"- skipped: {what} ({why})")
        lines += ["", f"![cost against peft]({_plot(model, s, out_dir / f'cost_{model}.png')})", ""]
    return "\n".join(lines)


def _ratio(x: float, method: str, fmt: str = ".1f") -> str:
    return "1 (baseline)" if method == "peft" else f"**{x:{fmt}}**"


def _num(x: float | None, fmt: str, scale: float = 1.0) -> str:
    return "–" if x is None else f"{x * scale:{fmt}}"


def _plot(model: str, summary: dict[str, dict[str, Any]], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    for ax, key, label, log in ((axes[0], "step_ratio", "step time / peft's", False),
                                (axes[1], "init_ratio", "init time / peft's (log)", True),
                                (axes[2], None, "peft-format file / peft's", False)):
        vals = [summary[m]["export_ratio"]["peft"] if key is None else summary[m][key] for m in methods]
        ax.barh(methods, vals, color=["gray" if m == "peft" else "tab:blue" for m in methods])
        ax.axvline(1.0, color="black", lw=0.8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
    axes[0].invert_yaxis()
    fig.suptitle(f"{model}: cost of each method against plain peft LoRA")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
