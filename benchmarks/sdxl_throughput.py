"""Steady-state training throughput of the SDXL DreamBooth trainer against a minimal diffusers + peft LoRA loop.

    python -m benchmarks.sdxl_throughput [--steps N] [--repeats R] [--device cpu|cuda]
                                         [--out benchmarks/results/sdxl_throughput.json]

``--device cpu`` (the default) hides every GPU from the children (``CUDA_VISIBLE_DEVICES=""``), so the trainer's
accelerate and the baseline both run on the CPU; ``--device cuda`` puts both on the first GPU (the trainer through
accelerate, the baseline with ``.to("cuda")``) and also records each child's peak allocated GPU memory. The baseline
calls ``loss.item()`` every step; the trainer reads its losses back every ``--logging_steps`` (10) steps, the last
step included, so on a GPU the window's end is synchronised and host clocks time whole steps there too.

Everything runs on the embedded tiny SDXL pipeline (``tsd_diffusion.tiny.EMBEDDED_NAME``), resolution 64, batch 4,
rank 4 (alpha 4), UNet targets ``to_q, to_k, to_v, to_out.0``, AdamW (lr 1e-3, weight decay 1e-4: the trainer's
defaults for the embedded model), fp32, on the embedded 5-image subject. Configurations:

- ``a``  ``baseline``: a minimal loop written here: components loaded with ``from_pretrained`` from the resolved dir,
  ``unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=...))``, text
  embeddings (hidden + pooled) computed once; every step: VAE-encode the batch (fp32, ``latent_dist.sample()``),
  DDPM ``add_noise`` at uniform timesteps, UNet forward, MSE, backward, ``AdamW.step``, ``zero_grad``, ``loss.item()``.
  No accelerate, no grad clipping, no LR scheduler. It reads the same ``DreamBoothDataset`` through a plain
  ``DataLoader(batch_size=4, shuffle=True)`` as the trainer, so both do the same image work per step;
- ``b``  ``lora``: ``tsd_diffusion.train_sdxl`` with ``--method lora``;
- ``c``  ``dash``: the trainer with ``--method dash --dash_warmup_steps W`` (W < skip, so only post-switch steps are
  timed: the switch step and the step after it, where Adam re-creates λ's state, are outside the window);
- ``d1`` ``lora+cache`` and ``d2`` ``dash+cache``: (b) and (c) with ``--cache_latents --center_crop
  --cache_text_encoder_outputs`` (the latent cache key is the same every epoch, so every step after the first epoch
  is a cache hit; the child counts hits and misses; the prompt is encoded before the first step).

The report gives the two ratios the trainer is held to: ``lora`` and ``dash`` without caches (b, c) against (a), and
with the latent and text-embedding caches (d1, d2) against (a).

The trainer runs with ``--num_validation_images 1 --validation_inference_steps 2 --checkpointing_steps 100000``.

Timing: every configuration runs in a fresh subprocess (so ``ru_maxrss`` is that configuration's peak RSS) with
``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` (tiny models run faster single-threaded). The trainer writes an
``elapsed`` column (``time.perf_counter`` seconds since its first optimizer step started) into ``loss_log.csv``; the
baseline records the same per step. Throughput of one run = ``(steps - skip) / (elapsed[steps] - elapsed[skip])``:
the first ``--skip`` steps, start-up, validation and export are excluded. Runs are interleaved
``a, b, c, d1, d2, a, b, ...`` over ``--repeats`` to cancel drift; reported are the median steps/s per configuration,
its ratio to (a) (ratio of the medians, and the median of the per-repeat ratios, each repeat's (a) having run within
the same minute), images/s, and peak RSS (includes start-up, validation and export, which the trainer needs anyway).

Note: with 5 images and batch 4 an epoch is 2 optimizer steps, of 4 and 1 images; with an even ``steps - skip`` the
window holds as many of each. All configurations see exactly the same batch sequence of sizes.

The parent also records the share of the CPUs that *other* processes used while each child ran (psutil): timings
are only meaningful when it is small.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .report import machine_info, write_result

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "sdxl_throughput.json"
RESOLUTION, BATCH, RANK, N_IMAGES, IMAGE_SIZE = 64, 4, 4, 5, 96
LR, WEIGHT_DECAY = 1e-3, 1e-4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPT = "a photo of sks teapot"

#: name -> (label, description, trainer flags or None for the baseline)
CONFIGS: dict[str, tuple[str, str, list[str] | None]] = {
    "a": ("baseline", "minimal diffusers + peft LoRA loop (this file)", None),
    "b": ("lora", "trainer --method lora", ["--method", "lora"]),
    "c": ("dash", "trainer --method dash (post-switch steps)", ["--method", "dash"]),
    "d1": ("lora+cache", "trainer --method lora, latent + text-embedding caches",
           ["--method", "lora", "--cache_latents", "--center_crop", "--cache_text_encoder_outputs"]),
    "d2": ("dash+cache", "trainer --method dash, latent + text-embedding caches (post-switch steps)",
           ["--method", "dash", "--cache_latents", "--center_crop", "--cache_text_encoder_outputs"]),
}
#: the ratios the trainer is held to: (without caches, with caches) configuration per method
GOALS = {"lora": ("b", "d1"), "dash": ("c", "d2")}
ORDER = ["a", "b", "c", "d1", "d2"]


# ---------------------------------------------------------------------------------------------- child side
def _peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024


def batch_sizes(steps: int) -> list[int]:
    """Images in optimizer step 1..steps (the trainer's and the baseline's loader: shuffle, no drop_last)."""
    per_epoch = [BATCH] * (N_IMAGES // BATCH) + ([N_IMAGES % BATCH] if N_IMAGES % BATCH else [])
    return [per_epoch[i % len(per_epoch)] for i in range(steps)]


def run_baseline(steps: int, workdir: Path, device: str, seed: int = 0) -> list[tuple[int, float]]:
    """The minimal loop; returns ``[(step, elapsed)]`` like the trainer's loss log."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from tsd_diffusion.data import DreamBoothDataset, collate
    from tsd_diffusion.tiny import EMBEDDED_NAME, make_subject_images, resolve_pretrained

    torch.manual_seed(seed)
    base = resolve_pretrained(EMBEDDED_NAME)
    tokenizers = [AutoTokenizer.from_pretrained(base, subfolder=f, use_fast=False)
                  for f in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")]
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    for m in (vae, unet, *encoders):
        m.requires_grad_(False).to(device)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)

    with torch.no_grad():  # SDXL conditioning, once: penultimate hidden states of both encoders, pooled from the 2nd
        hidden = []
        for tok, enc in zip(tokenizers, encoders, strict=True):
            ids = tok([PROMPT], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(device), output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)

    make_subject_images(workdir / "instance_images", n=N_IMAGES, size=IMAGE_SIZE, seed=seed)
    dataset = DreamBoothDataset(workdir / "instance_images", PROMPT, RESOLUTION, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed))
    unet.train()
    rows: list[tuple[int, float]] = []
    t_first: float | None = None
    step, epoch = 0, 0
    while step < steps:
        dataset.set_epoch(epoch)
        for batch in loader:
            if t_first is None:
                t_first = time.perf_counter()
            pix = batch["pixel_values"].to(device)
            bsz = pix.shape[0]
            with torch.no_grad():
                latents = vae.encode(pix).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=device).long()
            noisy = scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, embeds.expand(bsz, -1, -1),
                        added_cond_kwargs={"text_embeds": pooled.expand(bsz, -1),
                                           "time_ids": batch["time_ids"].to(device)},
                        return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            step += 1
            rows.append((step, time.perf_counter() - t_first))
            if step >= steps:
                break
        epoch += 1
    return rows


def run_trainer(flags: list[str], steps: int, dash_warmup: int, workdir: Path) -> tuple[list[tuple[int, float]], dict]:
    """The trainer in this process; returns ``[(step, elapsed)]`` from its loss_log.csv and a few checks."""
    import tsd_diffusion.data as data
    from tsd_diffusion.train_sdxl import main, parse_args

    caches: list = []  # observe (not change) the trainer's latent cache: count hits and misses
    init = data.LatentCache.__init__

    def counting_init(self, *a, **kw):
        init(self, *a, **kw)
        caches.append(self)

    data.LatentCache.__init__ = counting_init
    out = workdir / "run"
    argv = ["--pretrained_model_name_or_path", "tsd-lora/tiny-sdxl", "--output_dir", str(out),
            "--max_train_steps", str(steps), "--resolution", str(RESOLUTION),
            "--train_batch_size", str(BATCH), "--rank", str(RANK), "--learning_rate", str(LR),
            "--dash_warmup_steps", str(dash_warmup), "--num_validation_images", "1",
            "--validation_inference_steps", "2", "--checkpointing_steps", "100000", *flags]
    summary = main(parse_args(argv))
    with open(out / "loss_log.csv") as f:
        log = list(csv.DictReader(f))
    if not log or "elapsed" not in log[0]:
        raise RuntimeError(f"{out / 'loss_log.csv'} has no 'elapsed' column: this trainer does not log step times")
    rows = [(int(r["step"]), float(r["elapsed"])) for r in log]
    unet = summary["adapters"]["unet"]
    checks: dict[str, Any] = {"trainer_steps": summary["steps"], "final_loss": summary.get("final_loss"),
                              "trainable_params": sum(p.numel() for p in unet.trainable_parameters())}
    if (out / "dash_switch.json").is_file():
        checks["dash_switch_step"] = json.loads((out / "dash_switch.json").read_text())["unet"]["step"]
        checks["switched"] = unet.switched
    if caches:
        checks["cache_hits"] = sum(c.hits for c in caches)
        checks["cache_misses"] = sum(c.misses for c in caches)
    return rows, checks


def child(config: str, steps: int, skip: int, dash_warmup: int, keep: bool, device: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix=f"sdxl_throughput_{config}_"))
    try:
        flags = CONFIGS[config][2]
        if flags is None:
            rows, checks = run_baseline(steps, workdir, device), {}
        else:
            rows, checks = run_trainer(flags, steps, dash_warmup, workdir)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if [s for s, _ in rows] != list(range(1, steps + 1)):
        raise RuntimeError(f"expected one log row per step 1..{steps}, got steps {[s for s, _ in rows]}")
    elapsed = [e for _, e in rows]
    window_s = elapsed[steps - 1] - elapsed[skip - 1]
    sizes = batch_sizes(steps)[skip:]
    return {"config": config, "steps": steps, "skip": skip, "timed_steps": steps - skip, "window_s": window_s,
            "steps_per_s": (steps - skip) / window_s, "images_per_s": sum(sizes) / window_s,
            "elapsed": elapsed, "peak_rss_mib": _peak_rss_mib(), "child_wall_s": time.perf_counter() - t0,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
            "torch_threads": torch.get_num_threads(), "workdir": str(workdir) if keep else None, **checks}


# ---------------------------------------------------------------------------------------------- parent side
class ForeignCpu:
    """Share of the machine's CPU time used by processes other than our children while one child ran."""

    def __init__(self) -> None:
        try:
            import psutil
        except ImportError:
            self.psutil = None
            return
        self.psutil, self.n = psutil, psutil.cpu_count() or 1
        self.t0, self.b0, self.c0 = time.perf_counter(), self._busy(), self._children()

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))

    @staticmethod
    def _children() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def share(self) -> float | None:
        if self.psutil is None:
            return None
        wall = max(time.perf_counter() - self.t0, 1e-9)
        other = (self._busy() - self.b0) - (self._children() - self.c0)
        return max(0.0, other) / (wall * self.n)


def run_child(config: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.sdxl_throughput", "--child", config, "--steps", str(args.steps),
           "--skip", str(args.skip), "--dash-warmup", str(args.dash_warmup), "--device", args.device] + (
               ["--keep"] if args.keep else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    mon = ForeignCpu()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    wall = time.perf_counter() - t0
    lines = [ln[len("RESULT "):] for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"child {config} failed (exit {p.returncode}):\n{(p.stderr or p.stdout)[-3000:]}")
    res = json.loads(lines[-1])
    res.update(process_wall_s=wall, foreign_cpu_share=mon.share())
    return res


def summarize(raw: list[dict[str, Any]], configs: list[str]) -> dict[str, Any]:
    by = {c: [r for r in raw if r["config"] == c] for c in configs}
    base = {r["repeat"]: r["steps_per_s"] for r in by["a"]} if "a" in by else {}
    out: dict[str, Any] = {}
    for c in configs:
        rates = [r["steps_per_s"] for r in by[c]]
        entry = {"label": CONFIGS[c][0], "description": CONFIGS[c][1],
                 "median_steps_per_s": statistics.median(rates), "min_steps_per_s": min(rates),
                 "max_steps_per_s": max(rates), "steps_per_s_per_repeat": rates,
                 "median_images_per_s": statistics.median(r["images_per_s"] for r in by[c]),
                 "median_step_ms": 1e3 / statistics.median(rates),
                 "peak_rss_mib_per_repeat": [r["peak_rss_mib"] for r in by[c]],
                 "median_peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in by[c]),
                 "peak_cuda_mib": max((r["peak_cuda_mib"] for r in by[c] if r.get("peak_cuda_mib")), default=None),
                 "median_child_wall_s": statistics.median(r["process_wall_s"] for r in by[c])}
        if base:
            per_rep = [r["steps_per_s"] / base[r["repeat"]] for r in by[c] if r["repeat"] in base]
            entry["ratio_vs_a_per_repeat"] = per_rep
            entry["ratio_vs_a_median_of_repeats"] = statistics.median(per_rep)
            entry["ratio_vs_a"] = entry["median_steps_per_s"] / out["a"]["median_steps_per_s"] if c != "a" else 1.0
        for key in ("cache_hits", "cache_misses", "dash_switch_step", "trainable_params"):
            vals = {r.get(key) for r in by[c] if key in r}
            if vals:
                entry[key] = sorted(vals)[0] if len(vals) == 1 else sorted(vals)
        out[c] = entry
    return out


def goal_ratios(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Steps/s of the trainer over the baseline's (ratio of medians) per method, without and with caches."""
    out: dict[str, dict[str, float]] = {"without_caches": {}, "with_caches": {}}
    for method, (plain, cached) in GOALS.items():
        for key, c in (("without_caches", plain), ("with_caches", cached)):
            if c in summary and "ratio_vs_a" in summary[c]:
                out[key][method] = summary[c]["ratio_vs_a"]
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    rows = ["| config | what | steps/s (median) | min–max | images/s | ratio vs (a): of medians / median per repeat "
            "| peak RSS (MiB) | process wall (s) |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c, e in result["summary"].items():
        ratio = ("1 (baseline)" if c == "a" else
                 f"**{e['ratio_vs_a']:.3f}** / {e['ratio_vs_a_median_of_repeats']:.3f}" if "ratio_vs_a" in e else "–")
        rows.append(f"| ({c}) {e['label']} | {e['description']} | {e['median_steps_per_s']:.2f} "
                    f"| {e['min_steps_per_s']:.2f}–{e['max_steps_per_s']:.2f} | {e['median_images_per_s']:.1f} "
                    f"| {ratio} | {e['median_peak_rss_mib']:.0f} | {e['median_child_wall_s']:.1f} |")
    where = (result["machine"].get("gpu") or "the GPU") if s.get("device") == "cuda" else "the CPU"
    notes = [f"- tiny SDXL, {s['resolution']} px, batch {s['batch']} ({N_IMAGES} images: steps alternate "
             f"{'/'.join(map(str, batch_sizes(2)))} images), rank {s['rank']}, fp32, 1 thread, on {where}; "
             f"steps/s over steps "
             f"{s['skip'] + 1}..{s['steps']} of each run ({s['steps'] - s['skip']} steps), median over "
             f"{s['repeats']} interleaved repeat(s); dash switch at step {s['dash_warmup']}"]
    for c, e in result["summary"].items():
        if e.get("peak_cuda_mib"):
            notes.append(f"- ({c}) peak allocated GPU memory {e['peak_cuda_mib']:.0f} MiB")
        if "cache_hits" in e:
            notes.append(f"- ({c}) latent cache: {e['cache_hits']} hits, {e['cache_misses']} misses per run")
    goals = result.get("goal_ratios", {})
    for key, label, target in (("without_caches", "without caches", 1.0), ("with_caches", "with latent + text "
                                                                                           "caches", 1.2)):
        if goals.get(key):
            notes.append(f"- trainer vs minimal loop {label} (goal >= {target}): " + ", ".join(
                f"{m} {r:.2f}" for m, r in goals[key].items()))
    shares = [r["foreign_cpu_share"] for r in result["raw"] if r.get("foreign_cpu_share") is not None]
    if shares:
        worst = max(shares)
        notes.append(f"- other processes used {100 * min(shares):.0f}–{100 * worst:.0f}% of the CPUs while the "
                     "children ran" + (" -- the machine was busy: rerun on an idle machine" if worst > 0.10 else ""))
    return "\n".join(rows + [""] + notes)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every configuration (default 3)")
    ap.add_argument("--skip", type=int, default=6, help="leading steps not timed (default 6)")
    ap.add_argument("--dash-warmup", type=int, default=5, help="--dash_warmup_steps for (c)/(d2); must be < --skip")
    ap.add_argument("--configs", nargs="+", default=ORDER, choices=ORDER, help="subset to run (a is the baseline)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both loops run (default cpu)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"default {DEFAULT_OUT.relative_to(REPO)}, or ..._cuda.json with --device cuda")
    ap.add_argument("--child-timeout", type=float, default=600.0)
    ap.add_argument("--keep", action="store_true", help="keep every child's output dir (printed in the JSON)")
    ap.add_argument("--child", choices=ORDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = DEFAULT_OUT if args.device == "cpu" else DEFAULT_OUT.with_name(f"{DEFAULT_OUT.stem}_cuda.json")
    if not 1 <= args.dash_warmup < args.skip:
        raise SystemExit("need 1 <= --dash-warmup < --skip (only post-switch steps are timed)")
    if args.steps < args.skip + 2 or args.repeats < 1:
        raise SystemExit("need --steps >= --skip + 2 and --repeats >= 1")

    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.skip, args.dash_warmup, args.keep,
                                           args.device)), flush=True)
        return None

    t_start = time.perf_counter()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    from tsd_diffusion.tiny import EMBEDDED_NAME, resolve_pretrained

    base = resolve_pretrained(EMBEDDED_NAME)  # build the tiny pipeline once, outside every child
    configs = [c for c in ORDER if c in args.configs]
    if (args.steps - args.skip) % 2:
        print(f"[sdxl_throughput] note: {args.steps - args.skip} timed steps (odd): the window holds one more "
              f"{batch_sizes(args.skip + 1)[-1]}-image step than {batch_sizes(args.skip + 2)[-1]}-image steps",
              flush=True)
    result: dict[str, Any] = {
        "machine": machine_info("diffusers", "transformers", "peft", "accelerate"),
        "settings": {"steps": args.steps, "skip": args.skip, "repeats": args.repeats, "dash_warmup": args.dash_warmup,
                     "resolution": RESOLUTION, "batch": BATCH, "rank": RANK, "lora_alpha": RANK, "targets": TARGETS,
                     "images": N_IMAGES, "batch_sizes_per_step": batch_sizes(args.steps), "learning_rate": LR,
                     "weight_decay": WEIGHT_DECAY, "threads": 1, "base": base, "order": configs,
                     "device": args.device,
                     "trainer_flags": {c: CONFIGS[c][2] for c in configs if CONFIGS[c][2] is not None},
                     "trainer_common_flags": ["--num_validation_images", "1", "--validation_inference_steps", "2",
                                              "--checkpointing_steps", "100000", "--dash_warmup_steps",
                                              str(args.dash_warmup)],
                     "metric": "(steps - skip) / (elapsed[steps] - elapsed[skip]), elapsed = perf_counter seconds "
                               "since the first optimizer step started (trainer: loss_log.csv 'elapsed')"},
        "raw": [],
    }
    for rep in range(args.repeats):
        for c in configs:
            res = run_child(c, args)
            res["repeat"] = rep
            result["raw"].append(res)
            share = res["foreign_cpu_share"]
            print(f"[sdxl_throughput] repeat {rep + 1}/{args.repeats} ({c}) {CONFIGS[c][0]}: "
                  f"{res['steps_per_s']:.2f} steps/s, peak RSS {res['peak_rss_mib']:.0f} MiB, "
                  f"process {res['process_wall_s']:.1f} s"
                  + (f", others used {100 * share:.0f}% of the CPUs" if share is not None else ""), flush=True)
    result["summary"] = summarize(result["raw"], configs)
    result["goal_ratios"] = goal_ratios(result["summary"])
    write_result(result, args.out, markdown, t_start)
    return result


if __name__ == "__main__":
    main()
