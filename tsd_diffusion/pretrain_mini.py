"""Pretrain the mini SDXL base (:mod:`tsd_diffusion.mini_sdxl`) on CIFAR-10, on a CPU, deterministically from a seed.

    python scripts/pretrain_mini_sdxl.py --cifar_task_json PATH --output_dir tsd_diffusion/weights/mini-sdxl \
        [--work_dir DIR] [--seed 0]
    python scripts/sample_mini_sdxl.py       # then: the replay prior and reference sets that ship beside it

**The data it needs, and where it can still be had.** ``--cifar_task_json`` is BIG-bench 1.0.0's
``bigbench/benchmark_tasks/cifar10_classification/base64/task.json`` (the CIFAR-10 test set, 10 000 base64 PNGs).
The shipped base was pretrained from that file as the ``bigbench==1.0.0`` sdist carried it, but the package index
no longer serves that sdist (December 2026: "from versions: 0.0.1"), and no other package on the registries this
project can reach ships CIFAR-10. The same file is in the BIG-bench git repository (google/BIG-bench, same path),
which needs network access beyond the package registries. **So on a fresh machine of this project the base cannot
be re-pretrained today**; nothing else needs that data: the base, its tokenizers and the sample sets the default
run uses all ship with the package.

Phases (recipe and measurements: ``docs/mini_sdxl.md``), each resumable: a finished
phase leaves a ``<phase>.done.json`` in ``--work_dir`` and is skipped on a re-run; the UNet phase also checkpoints
every ``--checkpointing_steps`` (model, EMA, AdamW moments, RNG states, all safetensors) and continues from the
last one, ending where an uninterrupted run ends.

1. data: the CIFAR-10 test set (``--cifar_task_json``), 900 train + 100 held-out images per class;
2. classifier (evaluation only, trained on the train split);
3. VAE: MSE + 1e-9 KL (SD's 1e-6 on a mean loss ruins a VAE this small), batch 8, AdamW 2e-3, cosine; then the
   per-channel ``latents_mean``/``latents_std`` go into its config and the train split (and its flips) is
   encoded once;
4. UNet: epsilon DDPM loss with Min-SNR-5 weights, captions "a photo of a {class}" in four templates, 10% of
   them zeroed (what the pipeline feeds for an empty negative prompt), AdamW 4e-4 with warm-up and cosine,
   gradient clipping, EMA 0.999 (the EMA weights are saved), bf16 autocast (1.4-1.7x faster on AMX CPUs);
5. save: an fp16 ``StableDiffusionXLPipeline`` directory with the shipped CLIP BPE tokenizer files (``vocab.json``,
   ``merges.txt``) plus ``tsd_mini_sdxl.json`` (metrics), a model card ``README.md`` and the
   evaluation classifier in fp16 under ``evaluation/`` (the subject metrics of the trainer, app and benchmarks
   use it; ``from_pretrained`` ignores the folder);
6. evaluation with the stock pipeline ``__call__``: class accuracy of generations per guidance scale, the
   Fréchet distance in the classifier's feature space against held-out real images, and a memorisation check
   (nearest-train-image RMSE of generations vs of held-out real images), plus a sample grid.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from shared.io import atomic_write_json, atomic_write_text, load_safetensors, save_safetensors

from . import evaluation as ev
from . import mini_sdxl as mini

METRICS_FILE = "tsd_mini_sdxl.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar_task_json", required=True, type=Path,
                   help="BIG-bench 1.0.0's cifar10_classification/base64/task.json (see the module docstring)")
    p.add_argument("--output_dir", required=True, help="the fp16 pipeline directory to write")
    p.add_argument("--work_dir", default=None, help="intermediate results and checkpoints (default: <output_dir>.work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--classifier_epochs", type=int, default=15)
    p.add_argument("--vae_steps", type=int, default=3000)
    p.add_argument("--vae_batch_size", type=int, default=8)
    p.add_argument("--vae_learning_rate", type=float, default=2e-3)
    p.add_argument("--vae_kl_weight", type=float, default=1e-9)
    p.add_argument("--unet_steps", type=int, default=3400)
    p.add_argument("--unet_batch_size", type=int, default=64)
    p.add_argument("--unet_learning_rate", type=float, default=4e-4)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--snr_gamma", type=float, default=5.0)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--checkpointing_steps", type=int, default=250)
    p.add_argument("--eval_guidance", default="1,3,5,7.5", help="guidance scales of the sweep")
    p.add_argument("--eval_sweep_per_class", type=int, default=30)
    p.add_argument("--eval_per_class", type=int, default=100, help="samples per class at the best guidance")
    p.add_argument("--eval_inference_steps", type=int, default=30)
    args = p.parse_args(argv)
    args.output_dir = Path(args.output_dir)
    args.work_dir = Path(args.work_dir) if args.work_dir else args.output_dir.with_name(args.output_dir.name + ".work")
    args.eval_guidance = [float(g) for g in args.eval_guidance.split(",")]
    for name in ("vae_steps", "unet_steps", "checkpointing_steps", "eval_per_class", "eval_sweep_per_class"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------------- helpers
def _done(work: Path, phase: str) -> dict[str, Any] | None:
    path = work / f"{phase}.done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _finish(work: Path, phase: str, info: dict[str, Any]) -> dict[str, Any]:
    atomic_write_json(work / f"{phase}.done.json", info)
    return info


def _lr(base: float, step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warm-up, then cosine from ``base`` down to ``floor * base``."""
    return base * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / total)))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    state = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    return tensors, json.dumps(state["param_groups"])


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: str) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(groups)})


# ------------------------------------------------------------------------------------------------------ phases
def phase_classifier(args: argparse.Namespace, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    if (info := _done(args.work_dir, "classifier")) is not None:
        return info
    t0 = time.perf_counter()
    clf = ev.train_classifier(data["x_train"], data["y_train"], epochs=args.classifier_epochs, seed=args.seed)
    held = ev.logits(clf, data["x_held"]).argmax(1)
    per_class = {c: float((held[data["y_held"] == i] == i).float().mean()) for i, c in enumerate(mini.CLASSES)}
    info = {"wall_s": round(time.perf_counter() - t0, 1), "epochs": args.classifier_epochs,
            "held_out_accuracy": float((held == data["y_held"]).float().mean()), "per_class": per_class}
    ev.save_classifier(clf, args.work_dir / "classifier", **info)
    return _finish(args.work_dir, "classifier", info)


def phase_vae(args: argparse.Namespace, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    if (info := _done(args.work_dir, "vae")) is not None:
        return info
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    vae = mini.build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    x_train = data["x_train"]
    t0 = time.perf_counter()
    bar = tqdm(range(args.vae_steps), desc="VAE steps")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(args.vae_learning_rate, step, args.vae_steps, 50, 0.05)
        idx = torch.randint(0, len(x_train), (args.vae_batch_size,), generator=gen)
        x = x_train[idx]
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = F.mse_loss(recon.float(), x)
        loss = mse + args.vae_kl_weight * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(mse=f"{mse.item():.4f}")
    train_s = time.perf_counter() - t0
    vae.eval()
    with torch.no_grad():
        raw = [torch.cat([vae.encode(x[i:i + 500]).latent_dist.mean for i in range(0, len(x), 500)])
               for x in (x_train, x_train.flip(3))]
        z = torch.cat(raw)
        vae.register_to_config(scaling_factor=1.0, latents_mean=z.mean((0, 2, 3)).tolist(),
                               latents_std=z.std((0, 2, 3)).tolist())
        held = data["x_held"]
        recon = torch.cat([vae.decode(vae.encode(held[i:i + 500]).latent_dist.mean).sample
                           for i in range(0, len(held), 500)]).clamp(-1, 1)
    vae.save_pretrained(str(args.work_dir / "vae"), safe_serialization=True)
    latents = mini.encode_latents(vae, torch.cat([x_train, x_train.flip(3)]))
    save_safetensors({"latents": latents, "labels": torch.cat([data["y_train"]] * 2)},
                     args.work_dir / "latents.safetensors")
    clf = ev.load_classifier(args.work_dir / "classifier")
    psnr = 10 * math.log10(4 / F.mse_loss(recon, held).item())  # images in [-1, 1]: peak-to-peak 2
    info = {"wall_s": round(train_s, 1), "steps": args.vae_steps, "batch_size": args.vae_batch_size,
            "kl_weight": args.vae_kl_weight, "held_out_psnr_db": round(psnr, 2),
            "classifier_accuracy_on_reconstructions": ev.class_accuracy(clf, recon, data["y_held"]),
            "latents_mean": vae.config.latents_mean, "latents_std": vae.config.latents_std}
    return _finish(args.work_dir, "vae", info)


def _pipeline(args: argparse.Namespace, unet: Any, vae: Any | None = None) -> Any:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    te1, te2 = mini.build_text_encoders(args.seed)
    tok1, tok2 = mini.load_tokenizers()
    vae = vae or AutoencoderKL.from_pretrained(str(args.work_dir / "vae"))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=mini.build_scheduler())


def phase_unet(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    if (info := _done(args.work_dir, "unet")) is not None:
        return info
    torch.manual_seed(args.seed)
    unet = mini.build_unet()
    pipe = _pipeline(args, unet)
    prompts = [t.format(c) for t in mini.CAPTION_TEMPLATES for c in mini.CLASSES]  # index = template * 10 + class
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    stored = load_safetensors(args.work_dir / "latents.safetensors")
    latents, labels = stored["latents"], stored["labels"]
    noise_sched = DDPMScheduler(**{k: v for k, v in mini.SCHEDULER_CONFIG.items()
                                   if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")})
    snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)
    time_ids = torch.tensor([mini.TIME_IDS], dtype=torch.float32).expand(args.unet_batch_size, 6)

    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_learning_rate, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 2)
    ckpt = args.work_dir / "unet-checkpoint"
    step, wall, loss_log = 0, 0.0, []
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        tensors = load_safetensors(ckpt / "training.safetensors")
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        _load_optimizer(opt, {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, state["param_groups"])
        gen.set_state(tensors["rng.generator"])
        step, wall, loss_log = state["step"], state["wall_s"], state["loss_log"]
        print(f"resumed the UNet phase at step {step}")

    def save_checkpoint() -> None:
        opt_tensors, groups = _optimizer_tensors(opt)
        tmp = ckpt.with_name(ckpt.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_safetensors({**{f"unet.{k}": v for k, v in unet.state_dict().items()},
                          **{f"ema.{k}": v for k, v in ema.state_dict().items()},
                          **{f"opt.{k}": v for k, v in opt_tensors.items()}, "rng.generator": gen.get_state()},
                         tmp / "training.safetensors")
        atomic_write_json(tmp / "state.json",
                          {"step": step, "wall_s": wall, "loss_log": loss_log, "param_groups": groups})
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)

    bs = args.unet_batch_size
    running = loss_log[-1][1] if loss_log else None
    bar = tqdm(total=args.unet_steps, initial=step, desc="UNet steps")
    t0 = time.perf_counter()
    while step < args.unet_steps:
        for g in opt.param_groups:
            g["lr"] = _lr(args.unet_learning_rate, step, args.unet_steps, 100, 0.1)
        idx = torch.randint(0, len(latents), (bs,), generator=gen)
        template = torch.randint(0, len(mini.CAPTION_TEMPLATES), (bs,), generator=gen)
        which = template * len(mini.CLASSES) + labels[idx]
        keep = (torch.rand(bs, generator=gen) >= args.caption_dropout).float()
        ctx, pool = embeds[which] * keep[:, None, None], pooled[which] * keep[:, None]
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (bs,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(zt, t, encoder_hidden_states=ctx,
                        added_cond_kwargs={"text_embeds": pool, "time_ids": time_ids}).sample
        weight = snr[t].clamp(max=args.snr_gamma) / snr[t]  # Min-SNR-γ for epsilon prediction
        loss = (F.mse_loss(pred.float(), noise, reduction="none").mean((1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
        if step % 100 == 0:
            loss_log.append([step, round(running, 5)])
        if step % args.checkpointing_steps == 0 and step < args.unet_steps:
            wall += time.perf_counter() - t0
            save_checkpoint()
            t0 = time.perf_counter()
    bar.close()
    wall += time.perf_counter() - t0
    ema.save_pretrained(str(args.work_dir / "unet"), safe_serialization=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    info = {"wall_s": round(wall, 1), "steps": args.unet_steps, "batch_size": bs, "samples_seen": args.unet_steps * bs,
            "params": sum(p.numel() for p in unet.parameters()), "loss_log": loss_log}
    return _finish(args.work_dir, "unet", info)


def phase_save(args: argparse.Namespace) -> None:
    from diffusers import UNet2DConditionModel

    if _done(args.work_dir, "save") is not None and (args.output_dir / "model_index.json").is_file():
        return
    pipe = _pipeline(args, UNet2DConditionModel.from_pretrained(str(args.work_dir / "unet")))
    tmp = args.output_dir.with_name(args.output_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    for sub in mini.TOKENIZER_DIRS:  # transformers 5 saves tokenizer.json only: ship the slow files, as SDXL does
        shutil.rmtree(tmp / sub)
    mini.copy_tokenizers(tmp)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    tmp.rename(args.output_dir)
    _finish(args.work_dir, "save", {"output_dir": str(args.output_dir)})


@torch.no_grad()
def phase_eval(args: argparse.Namespace, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    if (info := _done(args.work_dir, "eval")) is not None:
        return info
    t0 = time.perf_counter()
    full = args.work_dir / "pipeline-eval"  # the shipped fp16 files, loaded the way users will
    shutil.rmtree(full, ignore_errors=True)
    shutil.copytree(args.output_dir, full)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(full), dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    clf = ev.load_classifier(args.work_dir / "classifier")

    def generate(guidance: float, per_class: int) -> torch.Tensor:
        out = []
        for c, name in enumerate(mini.CLASSES):
            g = torch.Generator().manual_seed(args.seed * 100_000 + 1000 * c)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                images = pipe(f"a photo of a {name}", num_images_per_prompt=per_class, guidance_scale=guidance,
                              num_inference_steps=args.eval_inference_steps, generator=g, output_type="pt").images
            out.append(images.float() * 2 - 1)
        return torch.stack(out)  # classes x per_class x 3 x 32 x 32

    def accuracy(images: torch.Tensor) -> list[float]:
        return [ev.class_accuracy(clf, images[c], c) for c in range(len(mini.CLASSES))]

    sweep = []
    for guidance in args.eval_guidance:
        per = accuracy(generate(guidance, args.eval_sweep_per_class))
        sweep.append({"guidance": guidance, "per_class": args.eval_sweep_per_class, "accuracy": sum(per) / len(per)})
        print(f"guidance {guidance}: class accuracy {sweep[-1]['accuracy']:.3f}")
    best = max(sweep, key=lambda r: r["accuracy"])["guidance"]
    images = generate(best, args.eval_per_class)
    per = accuracy(images)
    flat = images.flatten(0, 1)
    f_held, f_gen = ev.features(clf, data["x_held"]), ev.features(clf, flat)
    pick = torch.randperm(len(data["x_train"]), generator=torch.Generator().manual_seed(0))[:len(data["x_held"])]
    gen_nn, _ = ev.nearest_rmse(flat, data["x_train"])
    held_nn, _ = ev.nearest_rmse(data["x_held"], data["x_train"])
    info = {
        "wall_s": round(time.perf_counter() - t0, 1), "inference_steps": args.eval_inference_steps, "sweep": sweep,
        "best_guidance": best, "per_class_at_best": args.eval_per_class,
        "class_accuracy": sum(per) / len(per), "class_accuracy_per_class": dict(zip(mini.CLASSES, per, strict=True)),
        "fd_generated_vs_held_out": ev.frechet_distance(f_gen, f_held),
        "fd_real_train_vs_held_out": ev.frechet_distance(ev.features(clf, data["x_train"][pick]), f_held),
        "nearest_train_rmse_generated": {"mean": float(gen_nn.mean()), "min": float(gen_nn.min())},
        "nearest_train_rmse_held_out_real": {"mean": float(held_nn.mean()), "min": float(held_nn.min())},
    }
    info["no_closer_to_training_images_than_real_held_out"] = (
        info["nearest_train_rmse_generated"]["mean"] >= info["nearest_train_rmse_held_out_real"]["mean"] * 0.95)
    k = min(8, images.shape[1])  # classes as rows, k samples as columns
    grid = mini.to_uint8(images[:, :k].permute(2, 0, 3, 1, 4).reshape(1, 3, -1, k * mini.RESOLUTION))[0]
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(
        args.work_dir / "samples.png")
    shutil.rmtree(full)
    return _finish(args.work_dir, "eval", info)


def write_card(args: argparse.Namespace, phases: dict[str, dict[str, Any]], data_info: dict[str, Any]) -> None:
    import diffusers
    import transformers

    shutil.copyfile(args.work_dir / "samples.png", args.output_dir / "samples.png")
    sizes = {str(p.relative_to(args.output_dir)): p.stat().st_size for p in sorted(args.output_dir.rglob("*"))
             if p.is_file()}
    record = {"date": _dt.date.today().isoformat(), "command": " ".join(sys.argv), "seed": args.seed,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "transformers": transformers.__version__},
              "data": data_info, "phases": phases, "pretraining_wall_s": round(sum(
                  phases[p]["wall_s"] for p in ("vae", "unet")), 1), "files_bytes": sizes}
    atomic_write_json(args.output_dir / METRICS_FILE, record)
    e, v, u, c = phases["eval"], phases["vae"], phases["unet"], phases["classifier"]
    sweep = ", ".join(f"{r['guidance']:g}: {r['accuracy']:.3f}" for r in e["sweep"])
    atomic_write_text(args.output_dir / "README.md", f"""# mini SDXL (tsd-lora embedded base)

A 32x32 text-to-image pipeline of the real SDXL architecture (stock `StableDiffusionXLPipeline`: `UNet2DConditionModel`
with `addition_embed_type="text_time"`, two CLIP text encoders, `AutoencoderKL`, Euler), pretrained on a CPU by
`scripts/pretrain_mini_sdxl.py` of tsd-lora. A demo and test base for subject-driven fine-tuning, not a quality model.

- Command: `{record['command']}` (seed {args.seed}), {record['date']}, {record['machine']};
  torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}.
- Data: {data_info['source']}; {data_info['train']} training images (900 per class), {data_info['held_out']} held out
  (100 per class, used only for evaluation). Captions: "a photo of a {{class}}" in {len(mini.CAPTION_TEMPLATES)}
  templates, {args.caption_dropout:.0%} dropped to the empty prompt. Provenance: CIFAR-10 (Krizhevsky 2009, no explicit
  licence) as redistributed in the BIG-bench sdist, whose canary asks that BIG-bench data not enter language-model
  training corpora; this is an image model. The package index no longer serves that sdist (December 2026), so the
  base cannot be re-pretrained on a fresh machine today (`scripts/pretrain_mini_sdxl.py` says where the file can
  still be had); none of the CIFAR images ship.
- Training: VAE {v['steps']} steps x {v['batch_size']} ({v['wall_s']:.0f} s), \
UNet {u['steps']} steps x {u['batch_size']}
  ({u['wall_s']:.0f} s), EMA weights; pretraining wall time {record['pretraining_wall_s'] / 60:.1f} min. \
The text encoders
  are random and frozen (seed {args.seed}). Weights in fp16. Tokenizers: the real CLIP BPE (49 408 tokens; MIT
  licence; open_clip's `bpe_simple_vocab_16e6.txt.gz` as `vocab.json` + `merges.txt`), the second padding with "!".
- VAE: held-out PSNR {v['held_out_psnr_db']} dB; the classifier scores {v['classifier_accuracy_on_reconstructions']:.3f}
  on reconstructions.
- Evaluation classifier (a 1.15 M CNN trained on the same train split): {c['held_out_accuracy']:.3f} held-out accuracy.
- Class-conditional accuracy of generations ({e['inference_steps']} Euler steps), by guidance: {sweep}; at guidance
  {e['best_guidance']:g} with {e['per_class_at_best']} per class: **{e['class_accuracy']:.3f}** (chance 0.1).
- Fréchet distance in the classifier's feature space to held-out real images: \
generated **{e['fd_generated_vs_held_out']:.2f}**,
  real train images {e['fd_real_train_vs_held_out']:.2f}.
- Memorisation check: mean RMSE to the nearest training image, generated {e['nearest_train_rmse_generated']['mean']:.3f}
  vs held-out real {e['nearest_train_rmse_held_out_real']['mean']:.3f} \
(no closer: {e['no_closer_to_training_images_than_real_held_out']}).

![Samples at guidance {e['best_guidance']:g}: one row per class, airplane to truck](samples.png)
""")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    x, y = mini.load_cifar(args.cifar_task_json)
    x_train, y_train, x_held, y_held = mini.split_cifar(x, y)
    data = {"x_train": mini.to_tensor(x_train), "y_train": torch.from_numpy(y_train),
            "x_held": mini.to_tensor(x_held), "y_held": torch.from_numpy(y_held)}
    data_info = {"source": f"CIFAR-10 test set, bigbench sdist member {mini.CIFAR_MEMBER}", "train": len(x_train),
                 "held_out": len(x_held)}
    phases = {"classifier": phase_classifier(args, data)}
    phases["vae"] = phase_vae(args, data)
    phases["unet"] = phase_unet(args)
    phase_save(args)
    if not (args.output_dir / mini.EVALUATION_DIR / ev.CLASSIFIER_WEIGHTS).is_file():
        ev.save_classifier(ev.load_classifier(args.work_dir / "classifier"), args.output_dir / mini.EVALUATION_DIR,
                           dtype=torch.float16, **phases["classifier"])
    phases["eval"] = phase_eval(args, data)
    write_card(args, phases, data_info)
    e = phases["eval"]
    print(f"wrote {args.output_dir}: class accuracy {e['class_accuracy']:.3f} at guidance {e['best_guidance']:g}, "
          f"FD {e['fd_generated_vs_held_out']:.2f}, sample grid {args.work_dir / 'samples.png'}")


if __name__ == "__main__":
    main()
