"""What the dash switch costs on a full-size SDXL UNet, with its SVDs at the switch (before issue 28) and computed
ahead (``AdapterConfig.dash_svd``, ``shared.bases``), measured in one run, on CPU.

    python -m benchmarks.switch_cost [--unet sdxl|tiny] [--dtype bfloat16|float32] [--latent 32]
        [--baseline_steps 3] [--background_steps 4] [--split_layers 16] [--workdir DIR]
        [--out benchmarks/results/switch_cost.json]

The UNet is diffusers' ``UNet2DConditionModel`` built from stabilityai/stable-diffusion-xl-base-1.0's UNet config
(:data:`SDXL_UNET_CONFIG`, its values written out here: the hub is not reachable) with seeded random weights, in
bf16 by default (``--dtype``: 5.1 GB instead of 10.3 GB in fp32 on this shared 24 GB machine; the SVDs and the
adapter are fp32 either way, the SVD input being the fp32 upcast of the weight): 2.57 B parameters, 560 attention
linears (``to_q/to_k/to_v/to_out.0``, the SDXL trainer's targets). Dash at the
SDXL trainer's defaults (r = 4, alpha = 4, s = 8). One process, in this order, on the same LoRA factors:

1. **training steps** (forward, backward, AdamW; batch 1 at ``--latent`` × ``--latent`` latents with SDXL's text
   conditioning shapes): ``--baseline_steps`` timed, after an untimed one; these also move B off zero.
2. **background**: ``prepare_switch()`` with ``dash_svd="background"`` starts the SVD thread (idle priority), then
   ``--background_steps`` timed training steps run beside it (the slowdown against phase 1, and how many batched
   SVD calls the thread finished after each step); then the switch is timed: it reads what the thread finished and
   computes the rest itself.
3. **at the switch** (``dash_svd="switch"``, the core before issue 28): the switch with its SVDs, timed.
4. **up front with a cache, cold**: ``prepare_switch()`` with ``dash_svd="upfront"`` and an empty cache directory
   (the precompute, timed), then the switch.
5. **up front with the cache, warm** (a later run on the same base): ``prepare_switch()`` finds every file (hashing
   the weights and checking the files, timed), then the switch.
6. **overlap**: ``--overlap_pairs`` pairs of training steps, one with an idle-class thread doing SVDs beside it and
   one without (the order alternating): the paired step-time ratios, and the CPU time the thread got.

Between phases the dash terms are reset to their pre-switch state (no training in between), so every switch sees
the same factors, and the selections are checked bit-identical to phase 3's. Per phase: wall time and the sampled
peak RSS (psutil, every 20 ms) over the RSS before it. Files: the diffusers-format LoRA before the switch (rank r),
the dash export after it (rank r + s, folded), the native file, and the cache's bytes. The stall is stated against
a 500-step run at the median step time of phase 1: 500 × step at this latent size (a real 1024 px step is larger,
so the share at real size is smaller).

``--split_layers N``: a second measurement of the split across ranks, on N square 1024-wide linears: the switch
(``dash_svd="switch"``) in 1 and in 2 gloo processes of one thread each (``torch.multiprocessing``), median of 3.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shared

from .report import machine_info, write_result

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "switch_cost.json"
RUN_STEPS = 500
MB = 1 / 2**20

#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (diffusers UNet2DConditionModel), written out
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
#: the same structure at toy size, for a smoke run (``--unet tiny``)
TINY_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG, "attention_head_dim": [2, 4, 4], "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 64, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 64 + 6 * 8,
    "transformer_layers_per_block": [1, 1, 2], "norm_num_groups": 8,
}
TEXT_EMBEDS = {"sdxl": 1280, "tiny": 64}  # pooled text embedding width (projection input = it + 6 × time dim)
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the SDXL trainer's UNET_TARGETS
RANK, ALPHA, DIRECTIONS = 4, 4.0, 8  # the SDXL trainer's defaults


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_unet(kind: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = SDXL_UNET_CONFIG if kind == "sdxl" else TINY_UNET_CONFIG
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in ``dtype``: no fp32 copy of the whole UNet at any time
    try:
        return UNet2DConditionModel.from_config(config).to(dtype).requires_grad_(False)
    finally:
        torch.set_default_dtype(default)


class PeakRSS:
    """Sampled peak RSS of this process while the block runs (a thread reads it every ``interval`` s)."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._proc, self.interval = psutil.Process(), interval

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    def report(self) -> dict[str, float]:
        return {"rss_before_mb": self.before * MB, "peak_rss_mb": self.peak * MB,
                "peak_extra_mb": (self.peak - self.before) * MB}


def timed(fn: Any) -> tuple[Any, dict[str, float]]:
    """Run ``fn()``: its result and wall time, with the peak RSS around it."""
    from .overhead import CpuMonitor

    gc.collect()
    monitor = CpuMonitor()
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, {"seconds": seconds, **mem.report(), "foreign_cpu_share": monitor.foreign_share()}


class UNetSteps:
    """Training steps of the adapted UNet on one fixed random batch (noise-prediction MSE)."""

    def __init__(self, unet: nn.Module, adapter: shared.Adapter, kind: str, latent: int, dtype: torch.dtype) -> None:
        g = torch.Generator().manual_seed(1)
        self.unet, self.adapter = unet, adapter
        width = SDXL_UNET_CONFIG["cross_attention_dim"] if kind == "sdxl" else TINY_UNET_CONFIG["cross_attention_dim"]
        size = 8 * latent
        self.inputs = {"sample": torch.randn(1, 4, latent, latent, generator=g).to(dtype),
                       "timestep": torch.tensor([500]),
                       "encoder_hidden_states": torch.randn(1, 77, width, generator=g).to(dtype),
                       "added_cond_kwargs": {"text_embeds": torch.randn(1, TEXT_EMBEDS[kind], generator=g).to(dtype),
                                             "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype)}}
        self.target = torch.randn(1, 4, latent, latent, generator=g)
        self.optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-4)

    def step(self) -> float:
        start = time.perf_counter()
        self.unet.train()
        loss = nn.functional.mse_loss(self.unet(**self.inputs).sample.float(), self.target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def log(what: str, record: dict[str, Any]) -> None:
    took = f"{record['seconds']:.1f} s, " if isinstance(record.get("seconds"), float) else ""
    print(f"[switch_cost] {what}: {took}peak RSS {record['peak_rss_mb']:.0f} MB (+{record['peak_extra_mb']:.0f})",
          flush=True)


def timed_step(trainer: UNetSteps) -> tuple[float, float]:
    """One training step: its wall time and the CPU share other processes took meanwhile."""
    from .overhead import CpuMonitor

    monitor = CpuMonitor()
    return trainer.step(), monitor.foreign_share()


class IdleSVDLoad:
    """A thread in the idle scheduling class (as the background SVDs run, ``shared.bases``) doing SVDs of a
    1280 × 1280 matrix (SDXL's most common attention shape) back to back while it is on; its CPU time is counted."""

    def __init__(self) -> None:
        self.matrix = torch.randn(1, 1280, 1280, generator=torch.Generator().manual_seed(0))
        self.on, self.resting = threading.Event(), threading.Event()
        self.resting.set()
        self.cpu_s, self.calls = 0.0, 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from shared.bases import lower_thread_priority

        lower_thread_priority(torch.device("cpu"))
        while True:
            self.on.wait()
            self.resting.clear()
            start = time.thread_time()
            while self.on.is_set():
                shared.tsd.batched_svd(self.matrix)
                self.calls += 1
            self.cpu_s += time.thread_time() - start
            self.resting.set()

    def start(self) -> None:
        self.on.set()

    def stop(self) -> None:
        """Switch off and wait until the SVD in progress has ended."""
        self.on.clear()
        self.resting.wait()


def measure_overlap(trainer: UNetSteps, pairs: int) -> dict[str, Any]:
    """Training steps with and without an idle-class SVD thread beside them, paired step by step (the order
    alternating), so that a neighbour's load hits both halves of a pair alike."""
    load = IdleSVDLoad()
    on, off, cpu, calls = [], [], [], []
    for i in range(pairs):
        for with_load in ((False, True) if i % 2 == 0 else (True, False)):
            if with_load:
                cpu0, calls0 = load.cpu_s, load.calls
                load.start()
                on.append(trainer.step())
                load.stop()
                cpu.append(load.cpu_s - cpu0)
                calls.append(load.calls - calls0)
            else:
                off.append(trainer.step())
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    return {"pairs": pairs, "step_s_with_thread": on, "step_s_without": off, "paired_ratio": ratios,
            "median_paired_ratio": statistics.median(ratios), "thread_cpu_s_per_step": cpu,
            "thread_svds_finished_per_step": calls}


def unswitch(adapter: shared.Adapter) -> None:
    """Put every dash term back to its state before the switch (empty directions, λ = 0, no record)."""
    with torch.no_grad():
        for name in adapter.dash_layers:
            term = adapter.dash_term(name)
            term.U.zero_()
            term.Vh.zero_()
            term.lam.zero_()
            term.indices = term.sigma = term.delta_sigma = term.energy = None
            term.is_active = False


def selection(adapter: shared.Adapter) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": getattr(adapter.dash_term(n), k).detach().clone()
            for n in adapter.dash_layers for k in ("U", "Vh", "indices", "sigma", "delta_sigma", "energy")}


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def switch_with(adapter: shared.Adapter, schedule: str, cache_dir: Path | None) -> None:
    adapter.config.dash_svd = schedule
    adapter.config.dash_svd_cache_dir = None if cache_dir is None else str(cache_dir)


def measure_unet(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"unet": args.unet, "dtype": args.dtype, "latent": args.latent, "image_px": 8 * args.latent,
                           "batch": 1, "rank": RANK, "alpha": ALPHA, "directions": DIRECTIONS, "targets": TARGETS,
                           "torch_threads": torch.get_num_threads()}
    dtype = DTYPES[args.dtype]
    unet, built = timed(lambda: build_unet(args.unet, dtype))
    log(f"built the {args.unet} UNet ({args.dtype})", built)
    out["build"] = built
    out["parameters"] = sum(p.numel() for p in unet.parameters())
    config = shared.AdapterConfig(method="dash", r=RANK, alpha=ALPHA, target_modules=TARGETS,
                                  dash_warmup_steps=10**6, dash_directions=DIRECTIONS, dash_svd="switch")
    adapter, attached = timed(lambda: shared.attach(unet, config))
    out["attach"] = attached
    out["adapted_layers"] = len(adapter.dash_layers)
    out["adapted_weight_parameters"] = sum(adapter.dense_shape(n)[0] * adapter.dense_shape(n)[1]
                                           for n in adapter.dash_layers)
    out["svd_bases_bytes_fp32"] = sum(4 * (n * min(n, m) + min(n, m) + min(n, m) * m)
                                      for n, m in map(adapter.dense_shape, adapter.dash_layers))
    trainer = UNetSteps(unet, adapter, args.unet, args.latent, dtype)

    # 1. training steps
    trainer.step()
    with PeakRSS() as mem:
        steps, foreign = zip(*[timed_step(trainer) for _ in range(args.baseline_steps)], strict=True)
    out["step"] = {"seconds": steps, "foreign_cpu_share": foreign, "median_s": statistics.median(steps),
                   **mem.report()}
    log(f"training steps {[round(x, 1) for x in steps]}", out["step"])
    step_s = out["step"]["median_s"]
    shared.export_lora(adapter, work / "lora", format="diffusers")  # before the switch: the rank-r LoRA

    # 2. background
    switch_with(adapter, "background", None)
    adapter.prepare_switch()
    bases = adapter.switch_bases
    chunks = sum(bases.computes(i) for i in range(len(bases.chunks)))
    beside, done, foreign = [], [], []
    with PeakRSS() as mem:
        for _ in range(args.background_steps):
            s, f = timed_step(trainer)
            beside.append(s)
            foreign.append(f)
            done.append(len(bases.files))
    bg_record = {"where": "a thread of this process in the idle scheduling class (SCHED_IDLE), on the CPU",
                 "batched_calls": chunks, "step_seconds": beside, "foreign_cpu_share": foreign,
                 "median_step_s": statistics.median(beside), "slowdown": statistics.median(beside) / step_s - 1,
                 "calls_done_after_each_step": done, **mem.report()}
    log(f"steps beside the background thread {[round(x, 1) for x in beside]}, calls done {done}", mem.report())
    _, bg_record["switch"] = timed(adapter.switch)  # reads what the thread finished, computes the rest
    log("switch after the background thread", bg_record["switch"])
    bases.wait()  # the call the thread was on, if any, ends before the next phase
    reference = selection(adapter)
    out["background"] = bg_record

    # 3. at the switch (before issue 28)
    unswitch(adapter)
    switch_with(adapter, "switch", None)
    _, out["at_switch"] = timed(adapter.switch)
    log("switch with its SVDs (before issue 28)", out["at_switch"])
    out["at_switch"]["identical_to_background"] = identical(selection(adapter), reference)
    shared.export_lora(adapter, work / "dash", format="diffusers")
    shared.export_lora(adapter, work / "native", format="tsd")

    # 4. and 5. up front with a cache, cold then warm
    cache = work / "cache"
    for phase in ("cold", "warm"):
        unswitch(adapter)
        switch_with(adapter, "upfront", cache)
        _, prepared = timed(adapter.prepare_switch)
        prepared["cache_hits"], prepared["cache_rebuilt"] = adapter.switch_bases.cache_hits, \
            adapter.switch_bases.cache_rebuilt
        log(f"precompute, cache {phase}", prepared)
        _, stall = timed(adapter.switch)
        log(f"switch, cache {phase}", stall)
        out[f"upfront_cache_{phase}"] = {"precompute": prepared, "switch": stall,
                                        "identical_to_at_switch": identical(selection(adapter), reference)}

    # 6. overlap
    out["overlap"] = measure_overlap(trainer, args.overlap_pairs)
    print(f"[switch_cost] overlap: step time with / without an idle SVD thread "
          f"{[round(r, 3) for r in out['overlap']['paired_ratio']]}", flush=True)
    out["files_bytes"] = {"lora_diffusers": file_bytes(work / "lora"), "dash_diffusers": file_bytes(work / "dash"),
                          "dash_native": file_bytes(work / "native"), "svd_cache": file_bytes(cache)}
    run_s = RUN_STEPS * step_s
    out["run_500_steps_s"] = run_s
    out["stall_share_of_500_step_run"] = {
        "at_switch": out["at_switch"]["seconds"] / run_s,
        "background": bg_record["switch"]["seconds"] / run_s,
        "upfront_cache_cold": out["upfront_cache_cold"]["switch"]["seconds"] / run_s,
        "upfront_cache_warm": out["upfront_cache_warm"]["switch"]["seconds"] / run_s,
    }
    return out


# ---------------------------------------------------------------------------------------------- split across ranks
def _split_worker(rank: int, world: int, layers: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(layers)])
    config = shared.AdapterConfig(method="dash", r=8, alpha=16, target_modules=[str(i) for i in range(layers)],
                                  dash_warmup_steps=10**6, dash_directions=8, dash_svd="switch")
    adapter = shared.attach(model, config)
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_B["default"].weight.normal_(0, 1e-3, generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(3):
        unswitch(adapter)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        adapter.switch()
        times.append(time.perf_counter() - start)
    if rank == 0:
        fingerprint = float(sum(adapter.dash_term(n).U.double().sum() for n in adapter.dash_layers))
        Path(result_file).write_text(json.dumps({"seconds": times, "fingerprint": fingerprint}))
    if world > 1:
        dist.destroy_process_group()


def measure_split(layers: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    out: dict[str, Any] = {"layers": layers, "width": 1024, "threads_per_process": 1}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            result = Path(tmp) / f"world{world}.json"
            mp.spawn(_split_worker, args=(world, layers, str(Path(tmp) / f"init{world}"), str(result)), nprocs=world)
            got = json.loads(result.read_text())
            out[f"world{world}"] = {"seconds": got["seconds"], "median_s": statistics.median(got["seconds"]),
                                    "fingerprint": got["fingerprint"]}
    out["speedup"] = out["world1"]["median_s"] / out["world2"]["median_s"]
    out["same_directions"] = out["world1"]["fingerprint"] == out["world2"]["fingerprint"]
    return out


# ---------------------------------------------------------------------------------------------- report
PHASES = {  # row label, result key, where the SVDs run
    "at_switch": ("at the switch (the core before issue 28)", "at the switch, main thread"),
    "background": ("background (the default)", "SCHED_IDLE thread beside the steps; the rest at the switch"),
    "upfront_cache_cold": ("up front, empty cache", "main thread, before training"),
    "upfront_cache_warm": ("up front, cache of an earlier run", "main thread: hash the weights, check the files"),
}


def markdown(result: dict[str, Any]) -> str:
    u = result["unet"]
    step, share, bg, f = u["step"]["median_s"], u["stall_share_of_500_step_run"], u["background"], u["files_bytes"]
    precompute = {"at_switch": "-", "background": f"{bg['calls_done_after_each_step'][-1]} of {bg['batched_calls']} "
                  f"calls done after {len(bg['step_seconds'])} steps",
                  "upfront_cache_cold": f"{u['upfront_cache_cold']['precompute']['seconds']:.0f} s",
                  "upfront_cache_warm": f"{u['upfront_cache_warm']['precompute']['seconds']:.0f} s"}
    lines = [f"{u['unet']} UNet: {u['parameters'] / 1e9:.2f} B parameters, {u['adapted_layers']} adapted linears, "
             f"random {u['dtype']} weights; dash r = {u['rank']}, s = {u['directions']}; "
             f"{u['torch_threads']} torch threads. "
             f"Training step (batch 1, {u['image_px']} px, forward + backward + AdamW): median {step:.1f} s, so a "
             f"{RUN_STEPS}-step run takes {u['run_500_steps_s'] / 60:.0f} min at this size.", "",
             "| switch's SVDs | precompute | where | stall at the switch | of a 500-step run | peak RSS extra |",
             "|---|---|---|---:|---:|---:|"]
    for key, (label, where) in PHASES.items():
        rec = bg["switch"] if key == "background" else u[key] if key == "at_switch" else u[key]["switch"]
        lines.append(f"| {label} | {precompute[key]} | {where} | {rec['seconds']:.1f} s | {100 * share[key]:.2f} % | "
                     f"{rec['peak_extra_mb']:.0f} MB |")
    same = (u["at_switch"]["identical_to_background"], u["upfront_cache_cold"]["identical_to_at_switch"],
            u["upfront_cache_warm"]["identical_to_at_switch"])
    ov = u["overlap"]
    lines += ["", f"- Background: the steps beside the thread took {bg['median_step_s']:.2f} s (median) against "
              f"{step:.2f} s for the steps before it; batched SVD calls finished after each step: "
              f"{bg['calls_done_after_each_step']} of {bg['batched_calls']}.",
              f"- Idle-class SVD thread beside training, {ov['pairs']} pairs of steps: step time with / without "
              f"{[round(r, 3) for r in ov['paired_ratio']]}, median {ov['median_paired_ratio']:.3f}; the thread "
              f"got {[round(c, 1) for c in ov['thread_cpu_s_per_step']]} CPU s per step.",
              f"- Selections bit-identical to the switch's own SVDs (background, cache cold, cache warm): {same}.",
              f"- Files: LoRA (diffusers, rank {u['rank']}) {f['lora_diffusers'] * MB:.1f} MB; dash (diffusers, rank "
              f"{u['rank'] + u['directions']}) {f['dash_diffusers'] * MB:.1f} MB; dash native "
              f"{f['dash_native'] * MB:.1f} MB; SVD cache {f['svd_cache'] * MB / 1024:.2f} GB."]
    split = result.get("split")
    if split:
        lines.append(f"- Split across ranks ({split['layers']} linears 1024 × 1024, 1 thread per process): switch "
                     f"{split['world1']['median_s']:.2f} s in 1 process, {split['world2']['median_s']:.2f} s in 2 "
                     f"({split['speedup']:.2f}x), same directions: {split['same_directions']}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unet", choices=["sdxl", "tiny"], default="sdxl")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                   help="the UNet's weights (the SVDs and the adapter are fp32 either way)")
    p.add_argument("--latent", type=int, default=32, help="latent height and width of the training batch")
    p.add_argument("--baseline_steps", type=int, default=3)
    p.add_argument("--background_steps", type=int, default=4)
    p.add_argument("--overlap_pairs", type=int, default=4,
                   help="pairs of training steps with / without an idle-class SVD thread")
    p.add_argument("--split_layers", type=int, default=16, help="0: skip the split measurement")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info("torch", "diffusers", "peft")}
    with tempfile.TemporaryDirectory(prefix="switch_cost_", dir=args.workdir) as work:
        result["unet"] = measure_unet(args, Path(work))
    if args.split_layers:
        result["split"] = measure_split(args.split_layers)
    result["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    write_result(result, args.out, markdown, t0)
    return result


if __name__ == "__main__":
    main()
