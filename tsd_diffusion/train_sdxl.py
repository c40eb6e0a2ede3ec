"""DreamBooth LoRA training for SDXL with any method of the tsd-lora core (LoRA-Dash by default).

Mirrors diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py`` (same flag names, accelerate for
everything device-related) with these differences: the adapter comes from :func:`shared.attach` (so
``--method`` picks lora, dash, lora_init, tsd, eva, lora_da, pissa or lora_ga), the dash switch counts
optimizer steps, the output is a folded standard LoRA that stock ``load_lora_weights`` reproduces exactly,
augmentation is redrawn every epoch, latents are cached per (image, augmentation), checkpoints hold only
the adapter state (not the frozen base) and a resumed run equals an uninterrupted one.

With no arguments it trains on the embedded default: a tiny pipeline of the SDXL architecture and a
subject the project draws itself (``tsd_diffusion.tiny``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import shared
from tsd_common.checkpoints import resolve_resume, save_training_checkpoint
from shared.errors import InputError
from shared.io import atomic_write_json, atomic_write_text
from tsd_common.launch import check_launch

from .class_images import missing_class_images, sample_class_images
from .data import INTERPOLATIONS, DreamBoothDataset, LatentCache, collate, image_candidates, validate_resolution
from .evaluation import SubjectEvaluator, prompt_class
from .mini_sdxl import CLASSES, MINI_NAME, materialize_replay_prior
from .tiny import EMBEDDED_NAME, make_subject_images, resolve_pretrained

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}  # accelerate's mixed_precision names; others: fp32

#: the defaults of a run on an embedded base (flags the user gives win). The mini SDXL's are the recipe its study
#: measured to work (../shared/notes/mini_sdxl_recipes: text-encoder LoRA + a replay prior of captioned real images
#: of all classes with 10% empty prompts, lr 1e-3, 200 steps, 16 + 16 images per batch); the random-weight tiny
#: SDXL only exercises the plumbing.
EMBEDDED_DEFAULTS: dict[str, dict[str, Any]] = {
    MINI_NAME: dict(subject="car", instance_prompt="a photo of sks automobile", resolution=32, learning_rate=1e-3,
                    max_train_steps=200, train_text_encoder=True, text_encoder_lr=1e-3, with_prior_preservation=True,
                    class_prompt_dropout=0.1, num_class_images=1000, train_batch_size=16, num_validation_images=8,
                    random_flip=True),
    EMBEDDED_NAME: dict(subject="teapot", instance_prompt="a photo of sks teapot", resolution=64, learning_rate=1e-3,
                        max_train_steps=300),
}
VALIDATION_INFERENCE_STEPS = 25
#: what a flag is when neither the user nor an embedded default set it (diffusers' defaults)
GENERIC_DEFAULTS: dict[str, Any] = dict(resolution=1024, learning_rate=1e-4, train_text_encoder=False,
                                        text_encoder_lr=5e-6, with_prior_preservation=False, class_prompt_dropout=0.0,
                                        num_class_images=100, train_batch_size=4, num_validation_images=4,
                                        random_flip=False)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    # model
    a("--pretrained_model_name_or_path", default=MINI_NAME,
      help=f"hub id, local diffusers pipeline dir, {MINI_NAME!r} (default: the shipped CIFAR-pretrained mini SDXL) "
           f"or {EMBEDDED_NAME!r} (random weights, for plumbing tests)")
    a("--pretrained_vae_model_name_or_path", default=None, help="an fp16-safe VAE (e.g. madebyollin/sdxl-vae-fp16-fix)")
    a("--revision", default=None)
    a("--variant", default=None)
    # data
    a("--instance_data_dir", default=None, help="subject photos; default: the embedded subject (generated)")
    a("--instance_prompt", default=None, help="e.g. 'a photo of sks dog'; default for an embedded base: its subject's")
    a("--class_data_dir", default=None,
      help="prior images; a metadata.jsonl ({\"file_name\", \"text\"} per line) gives each its own caption (a replay prior)")
    a("--class_prompt", default=None, help="the prompt of class images without a caption")
    a("--with_prior_preservation", action=argparse.BooleanOptionalAction, default=None,
      help="default on for the mini SDXL (with its replay prior as --class_data_dir), else off")
    a("--prior_loss_weight", type=float, default=1.0)
    a("--num_class_images", type=int, default=None,
      help="default 100 (1000 for the mini SDXL's replay prior); a class dir with fewer is topped up by sampling "
           "--class_prompt from the base")
    a("--sample_batch_size", type=int, default=4, help="images per pipeline call when sampling class images")
    a("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"],
      help="precision of class-image sampling (a base loaded for it alone); default: the training precision")
    a("--class_prompt_dropout", type=float, default=None,
      help="replace this share of class prompts by the empty prompt (trains the unconditional branch CFG uses)")
    a("--resolution", type=int, default=None, help="default 1024; 32 for the mini SDXL, 64 for the tiny one")
    a("--center_crop", action="store_true")
    a("--image_interpolation_mode", default="lanczos", choices=sorted(INTERPOLATIONS),
      help="resampling filter of the resize to --resolution")
    a("--random_flip", action=argparse.BooleanOptionalAction, default=None)
    a("--repeats", type=int, default=1, help="repeat the instance images this many times per epoch (as diffusers)")
    a("--dataloader_num_workers", type=int, default=0)
    # training
    a("--train_batch_size", type=int, default=None, help="default 4 (16 for the mini SDXL)")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--max_train_steps", type=int, default=None,
      help="overrides --num_train_epochs; default 200 for the mini SDXL, 300 for the tiny one")
    a("--num_train_epochs", type=int, default=1)
    a("--learning_rate", type=float, default=None, help="default 1e-4, or 1e-3 for the embedded bases")
    a("--text_encoder_lr", type=float, default=None, help="default 5e-6 (1e-3 for the mini SDXL)")
    a("--scale_lr", action="store_true",
      help="multiply --learning_rate by processes x batch size x accumulation steps (as diffusers)")
    a("--lr_scheduler", default="constant",
      choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
    a("--lr_warmup_steps", type=int, default=0)
    a("--lr_num_cycles", type=int, default=1, help="hard restarts of cosine_with_restarts")
    a("--lr_power", type=float, default=1.0, help="power of the polynomial scheduler")
    a("--snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (5.0 is the paper's choice)")
    a("--noise_offset", type=float, default=0.0, help="offset noise scale (diffusers' flag; 0.05-0.1 is usual)")
    a("--max_grad_norm", type=float, default=1.0)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-4)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--use_8bit_adam", action="store_true")
    a("--gradient_checkpointing", action="store_true")
    a("--enable_xformers_memory_efficient_attention", action="store_true",
      help="xformers attention in the UNet (needs xformers and CUDA); without it PyTorch's SDPA is used")
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    a("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs (faster, ~10 mantissa bits)")
    a("--cache_latents", action="store_true", help="VAE-encode each (image, augmentation) once")
    a("--train_text_encoder", action=argparse.BooleanOptionalAction, default=None,
      help="LoRA on both text encoders; default on for the mini SDXL (its subject binding needs it), else off")
    a("--seed", type=int, default=0)
    # adapter
    a("--method", default="dash", choices=list(shared.METHODS))
    a("--rank", type=int, default=4)
    a("--lora_alpha", type=float, default=None, help="default: rank (scale 1, as diffusers)")
    a("--lora_dropout", type=float, default=0.0)
    a("--dash_warmup_steps", type=int, default=100, help="t: optimizer steps of LoRA before the dash switch")
    a("--dash_directions", type=int, default=8, help="s: task-specific directions per layer")
    a("--statistics_batches", type=int, default=8, help="batches the data-driven inits (eva, lora_da, lora_init, tsd) read")
    # validation, checkpoints, output
    a("--validation_prompt", action="append", default=None, help="repeat for several prompts")
    a("--num_validation_images", type=int, default=None, help="per prompt; default 4 (8 for the mini SDXL)")
    a("--validation_steps", type=int, default=None, help="validate every N steps (and always at the end)")
    a("--validation_epochs", type=int, default=None, help="validate after every N epochs (diffusers' spelling)")
    a("--validation_inference_steps", type=int, default=VALIDATION_INFERENCE_STEPS)
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help='a checkpoint dir or "latest"')
    a("--output_dir", default="outputs/sdxl-lora")
    a("--overwrite_output_dir", action="store_true",
      help="start a new run over an earlier one's checkpoints (they are deleted)")
    a("--output_format", default="diffusers", choices=["diffusers", "kohya", "peft"])
    a("--output_kohya_format", action="store_true", help="diffusers' spelling of --output_format kohya")
    a("--report_to", default="none", help="tensorboard, wandb, all or none")
    a("--logging_dir", default="logs", help="trackers' log dir, relative to --output_dir")
    a("--local_rank", type=int, default=-1, help="accepted for old launch scripts; accelerate reads LOCAL_RANK")
    return p.parse_args(argv)


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other flags and reject bad input before any compute."""
    embedded = EMBEDDED_DEFAULTS.get(args.pretrained_model_name_or_path, {})
    for name, generic in GENERIC_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, embedded.get(name, generic))
    if args.max_train_steps is None:
        args.max_train_steps = embedded.get("max_train_steps")
    validate_resolution(args.resolution)
    args.embedded_subject = args.instance_data_dir is None
    if args.embedded_subject:
        if not embedded:
            raise InputError("--instance_data_dir is required with a custom --pretrained_model_name_or_path")
        args.instance_data_dir = str(Path(args.output_dir) / "instance_images")
        args.instance_prompt = args.instance_prompt or embedded["instance_prompt"]
    if not args.instance_prompt:
        raise InputError("--instance_prompt is required (e.g. 'a photo of sks dog')")
    if args.with_prior_preservation:
        if not args.class_data_dir and args.pretrained_model_name_or_path != MINI_NAME:  # (the mini's: in main())
            raise InputError("--with_prior_preservation needs --class_data_dir (and --class_prompt unless every class "
                             "image has a caption in its metadata.jsonl)")
    elif args.class_data_dir or args.class_prompt:
        print("warning: --class_data_dir/--class_prompt are ignored without --with_prior_preservation")
        args.class_data_dir = args.class_prompt = None
    if args.rank <= 0:
        raise InputError(f"--rank must be > 0, got {args.rank}")
    if args.output_kohya_format:
        if args.output_format not in ("diffusers", "kohya"):
            raise InputError(f"--output_kohya_format contradicts --output_format {args.output_format}")
        args.output_format = "kohya"
    args.lora_alpha = float(args.lora_alpha or args.rank)
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "num_validation_images",
                 "num_class_images", "sample_batch_size", "repeats"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name} must be > 0")
    if not args.noise_offset >= 0:
        raise InputError(f"--noise_offset must be >= 0, got {args.noise_offset}")
    for name in ("max_train_steps", "validation_steps", "validation_epochs"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"--{name} must be > 0")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise InputError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers (without "
                         "the flag the UNet uses PyTorch's scaled_dot_product_attention, memory-efficient on GPUs)")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
    args.validation_prompt = args.validation_prompt or _default_validation_prompts(args)
    return args


def _default_validation_prompts(args: argparse.Namespace) -> list[str]:
    """The subject prompt, plus for the mini SDXL the plain class prompt and another class (drift checks), or for
    the tiny one a recontextualisation."""
    prompt = args.instance_prompt
    if args.pretrained_model_name_or_path == MINI_NAME:
        cls = prompt_class(prompt, CLASSES)
        if cls is not None:
            other = "dog" if cls != "dog" else "cat"
            return [prompt, f"a photo of a {cls}", f"a photo of a {other}"]
        return [prompt]
    if args.embedded_subject:
        return [prompt, f"{prompt} on a beach", f"a photo of {prompt.split()[-1]}"]
    return [prompt]


def adapter_config(args: argparse.Namespace, targets: list[str], method: str | None = None,
                   train_size: int | None = None) -> shared.AdapterConfig:
    """The adapter's config; ``train_size`` (the training set's length) is LoRA-DA's population N."""
    return shared.AdapterConfig(
        method=method or args.method, r=args.rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
        target_modules=targets, dash_warmup_steps=args.dash_warmup_steps, dash_directions=args.dash_directions,
        seed=args.seed, eva_max_batches=args.statistics_batches, lora_init_steps=args.statistics_batches,
        lora_ga_batches=args.statistics_batches, lora_da_num_samples=args.statistics_batches * args.train_batch_size,
        lora_da_population=train_size,
    )


# ---------------------------------------------------------------------------------------------- model pieces
class SDXLParts:
    """The frozen pipeline components the trainer needs, loaded through ``from_pretrained`` like a real SDXL."""

    def __init__(self, args: argparse.Namespace, base: str) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        kw = dict(revision=args.revision)
        self.tokenizers = [AutoTokenizer.from_pretrained(base, subfolder=f, use_fast=False, **kw)
                           for f in ("tokenizer", "tokenizer_2")]
        # float32 first, as diffusers' scripts load (transformers would keep fp16-saved weights in fp16); the
        # trainer casts to the mixed-precision dtype itself
        self.text_encoders = [CLIPTextModel.from_pretrained(base, subfolder="text_encoder", variant=args.variant,
                                                            dtype=torch.float32, **kw),
                              CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2",
                                                                          variant=args.variant, dtype=torch.float32, **kw)]
        vae_src = args.pretrained_vae_model_name_or_path
        self.vae = (AutoencoderKL.from_pretrained(vae_src) if vae_src else
                    AutoencoderKL.from_pretrained(base, subfolder="vae", variant=args.variant, **kw))
        self.unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=args.variant, **kw)
        self.scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kw)
        self.vae_fp16_safe = bool(vae_src)
        index = Path(base) / "model_index.json"  # a hub id: SDXL's default
        self.zeros_for_empty_prompt = (json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)
                                       if index.is_file() else True)
        for m in (self.vae, self.unet, *self.text_encoders):
            m.requires_grad_(False)

    def place(self, device: torch.device, dtype: torch.dtype) -> "SDXLParts":
        """Move to ``device`` and cast to ``dtype``; SDXL's own VAE stays fp32 (it overflows in fp16)."""
        vae_dtype = dtype if self.vae_fp16_safe else torch.float32
        for module, d in [(self.unet, dtype), (self.vae, vae_dtype), *((e, dtype) for e in self.text_encoders)]:
            module.to(device)
            if d != torch.float32:
                module.to(dtype=d)
        return self

    def pipeline(self, base: str, args: argparse.Namespace, accelerator: Any) -> Any:
        """A ``StableDiffusionXLPipeline`` over these components (the trained ones unwrapped), without progress bars."""
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(
            base, vae=self.vae, unet=accelerator.unwrap_model(self.unet),
            text_encoder=accelerator.unwrap_model(self.text_encoders[0]),
            text_encoder_2=accelerator.unwrap_model(self.text_encoders[1]), revision=args.revision,
            variant=args.variant,
        ).to(accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL conditioning: penultimate hidden states of both encoders concatenated, pooled from the second.

        The empty prompt gets zeros when the pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL's default):
        that is what the pipeline feeds the unconditional branch of classifier-free guidance.
        """
        embeds, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            out = enc(ids, output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        embeds = torch.cat(embeds, dim=-1)
        if self.zeros_for_empty_prompt and "" in prompts:
            keep = torch.tensor([p != "" for p in prompts], device=embeds.device)
            embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        return embeds, pooled

    @torch.no_grad()
    def latent_params(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE posterior (mean, std) stacked on dim 1, so cached and fresh latents sample the same way."""
        dist = self.vae.encode(pixel_values.to(self.vae.device, self.vae.dtype)).latent_dist
        return torch.stack([dist.mean, dist.std], 1).float().contiguous()

    def sample_latents(self, params: torch.Tensor) -> torch.Tensor:
        # noise drawn by shape, not randn_like: the VAE may return channels-last tensors, and randn_like follows
        # their strides, so cached and fresh latents would get different noise for the same RNG state
        noise = torch.randn(params[:, 0].shape, device=params.device, dtype=params.dtype)
        latents = params[:, 0] + params[:, 1] * noise
        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
            return (latents - mean) * cfg.scaling_factor / std
        return latents * cfg.scaling_factor


def unet_loss(unet, scheduler, latents, embeds, pooled, time_ids, *, snr_gamma=None, generator=None,
              reduce: bool = True, noise_offset: float = 0.0) -> torch.Tensor:
    """Denoising loss at uniform timesteps (epsilon or v target), optionally Min-SNR weighted.

    ``noise_offset`` adds ``noise_offset * n`` with ``n ~ N(0, 1)`` per sample and channel (constant over the
    image) to the noise, as diffusers' ``--noise_offset`` (Guttenberg 2023), so the model learns to shift the mean
    brightness.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                                   device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, t)
        weight = torch.clamp(snr, max=snr_gamma) / (snr if scheduler.config.prediction_type == "epsilon" else snr + 1)
        loss = loss * weight
    return loss.mean() if reduce else loss


# ---------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def generate(pipe, prompt: str, num_images: int, seed: int, steps: int, resolution: int) -> torch.Tensor:
    """The validation images of one prompt (CPU generator seeded with ``seed``): N x 3 x R x R in [-1, 1]."""
    images = pipe(prompt, num_images_per_prompt=num_images, generator=torch.Generator(device="cpu").manual_seed(seed),
                  num_inference_steps=steps, height=resolution, width=resolution, output_type="pt").images
    return images.float().cpu() * 2 - 1


@torch.no_grad()
def run_validation(parts: SDXLParts, base: str, args, accelerator, step: int, out_dir: Path,
                   evaluator=None) -> tuple[list[Path], list[dict[str, Any]]]:
    """Generate ``--num_validation_images`` per validation prompt (seeded), save them, a grid (a row per prompt)
    and, when the base ships an evaluator (the mini SDXL), ``metrics.json`` with the subject metrics per prompt."""
    import numpy as np
    from PIL import Image

    from .mini_sdxl import to_uint8

    pipe = parts.pipeline(base, args, accelerator)
    trained = [m for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) if m.training]
    for m in trained:
        m.eval()
    step_dir = out_dir / f"step-{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    paths, rows, metrics = [], [], []
    for i, prompt in enumerate(args.validation_prompt):
        images = generate(pipe, prompt, args.num_validation_images, args.seed, args.validation_inference_steps,
                          args.resolution)
        pixels = to_uint8(images)
        for j, img in enumerate(pixels):
            path = step_dir / f"prompt{i}-{j}.png"
            Image.fromarray(img).save(path)
            paths.append(path)
        rows.append(pixels)
        if evaluator is not None:
            metrics.append(evaluator.score(prompt, images))
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    scale = max(1, 96 // args.resolution)  # small bases: enlarge (nearest) so the grid is visible
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST).save(
        step_dir / "grid.png")
    atomic_write_json(step_dir / "prompts.json", args.validation_prompt)
    if metrics:
        atomic_write_json(step_dir / "metrics.json", metrics)
        for m in metrics:
            accelerator.print(f"validation step {step}: {m['prompt']!r}: subject probe {m['subject_probe']:.2f}"
                              + (f", class accuracy {m['class_accuracy']:.2f}" if m["class_accuracy"] is not None else ""))
    for m in trained:
        m.train()
    return paths, metrics


# ---------------------------------------------------------------------------------------------- training
def _sample_class_images(parts: SDXLParts, base: str, args: argparse.Namespace, accelerator: Any, n: int) -> None:
    sample_class_images(parts.pipeline(base, args, accelerator), accelerator, args.class_data_dir, args.class_prompt,
                        n, batch_size=args.sample_batch_size, resolution=args.resolution, seed=args.seed)


def make_dataset(args: argparse.Namespace) -> DreamBoothDataset:
    return DreamBoothDataset(
        args.instance_data_dir, args.instance_prompt, args.resolution, args.center_crop, args.random_flip,
        class_dir=args.class_data_dir, class_prompt=args.class_prompt, seed=args.seed,
        num_class_images=args.num_class_images if args.with_prior_preservation else None,
        class_prompt_dropout=args.class_prompt_dropout, interpolation=args.image_interpolation_mode,
        repeats=args.repeats,
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train, export and validate; returns a summary (paths, losses, steps)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    args = finalize_args(args)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    check_launch(accelerator)
    resume_dir = resolve_resume(accelerator, args.resume_from_checkpoint, output_dir, marker="unet",
                                overwrite=args.overwrite_output_dir)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if accelerator.is_main_process:
        if args.embedded_subject:
            make_subject_images(args.instance_data_dir, n=5, size=max(96, args.resolution), seed=args.seed,
                                subject=EMBEDDED_DEFAULTS[args.pretrained_model_name_or_path]["subject"])
    accelerator.wait_for_everyone()
    image_candidates(args.instance_data_dir, "instance")  # a missing or empty dir is named before anything is built
    if args.with_prior_preservation and not args.class_data_dir:  # the mini SDXL's replay prior (built once, locked)
        args.class_data_dir = str(materialize_replay_prior())
    to_sample = missing_class_images(args)  # checks the data dirs before any model loads
    dataset = None if to_sample else make_dataset(args)  # validates every image before any model loads
    set_seed(args.seed)
    base = resolve_pretrained(args.pretrained_model_name_or_path)
    weight_dtype = PRECISIONS.get(accelerator.mixed_precision, torch.float32)
    sample_dtype = PRECISIONS.get(args.prior_generation_precision or accelerator.mixed_precision, torch.float32)
    if to_sample and sample_dtype != weight_dtype:  # a base of its own, freed before the training one loads
        _sample_class_images(SDXLParts(args, base).place(accelerator.device, sample_dtype), base, args,
                             accelerator, to_sample)
        to_sample = 0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the sampling base's cached blocks back before the training base loads
    parts = SDXLParts(args, base).place(accelerator.device, weight_dtype)
    if to_sample:  # with the frozen base at the training precision, before any adapter is attached
        _sample_class_images(parts, base, args, accelerator, to_sample)
    if dataset is None:
        dataset = make_dataset(args)
    evaluator = (SubjectEvaluator.for_base(base, dataset.instance_images, args.resolution)
                 if accelerator.is_main_process else None)
    if args.enable_xformers_memory_efficient_attention:
        parts.unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for enc in parts.text_encoders:
                enc.gradient_checkpointing_enable()

    # frozen text conditioning, computed once unless the text encoders train
    prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def condition(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if args.train_text_encoder:
            return parts.encode_prompt(prompts)
        for p in set(prompts) - set(prompt_cache):
            with torch.no_grad():
                e, pool = parts.encode_prompt([p])
            prompt_cache[p] = (e[0], pool[0])
        return (torch.stack([prompt_cache[p][0] for p in prompts]), torch.stack([prompt_cache[p][1] for p in prompts]))

    latent_cache = LatentCache() if args.cache_latents else None

    def latents_for(batch: dict[str, Any]) -> torch.Tensor:
        pix = batch["pixel_values"]
        if latent_cache is None:
            params = parts.latent_params(pix)
        else:
            params = latent_cache.get_or_compute(batch["cache_keys"], lambda idx: parts.latent_params(pix[idx]))
        return parts.sample_latents(params.to(accelerator.device)).to(weight_dtype)

    # adapters: restored exactly from a checkpoint, or attached (data-driven inits read instance batches)
    te_method = "dash" if shared.METHODS[args.method].dash_phase else "lora"
    if resume_dir is not None:
        adapters = {"unet": shared.load(parts.unet, resume_dir / "unet")}
        if args.train_text_encoder:
            for name, enc in zip(("text_encoder", "text_encoder_2"), parts.text_encoders):
                adapters[name] = shared.load(enc, resume_dir / name)
    else:
        stats = (_statistics_batches(dataset, args, condition, latents_for, accelerator.device, weight_dtype)
                 if shared.METHODS[args.method].needs_data else None)
        gen = torch.Generator(device=accelerator.device)

        def forward_fn(unet, batch):
            gen.manual_seed(args.seed + batch["i"])
            return unet_loss(unet, parts.scheduler, batch["latents"], batch["embeds"], batch["pooled"],
                             batch["time_ids"], generator=gen)

        unet_config = adapter_config(args, UNET_TARGETS, train_size=len(dataset))
        adapters = {"unet": shared.attach(parts.unet, unet_config, data=stats, forward_fn=forward_fn,
                                          progress=accelerator.is_main_process)}
        if args.train_text_encoder:  # data-driven inits apply to the UNet; text encoders get lora or dash
            for name, enc in zip(("text_encoder", "text_encoder_2"), parts.text_encoders):
                adapters[name] = shared.attach(enc, adapter_config(args, TEXT_ENCODER_TARGETS, te_method))

    groups = [{"params": adapters["unet"].trainable_parameters(), "lr": args.learning_rate}]
    for name in ("text_encoder", "text_encoder_2"):
        if name in adapters:
            groups.append({"params": adapters[name].trainable_parameters(), "lr": args.text_encoder_lr})
    opt_cls = torch.optim.AdamW
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        opt_cls = bnb.optim.AdamW8bit
    # lr= also sets the optimizer's default, which diffusers' polynomial schedule reads as its starting lr
    optimizer = opt_cls(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    trained = [parts.unet] + ([*parts.text_encoders] if args.train_text_encoder else [])
    *trained, optimizer, loader, lr_scheduler = accelerator.prepare(*trained, optimizer, loader, lr_scheduler)
    parts.unet = trained[0]
    if args.train_text_encoder:
        parts.text_encoders = trained[1:]

    def save_hook(models, weights, out):  # checkpoints hold the adapters' native state, not the frozen base
        if accelerator.is_main_process:
            for name, adapter in adapters.items():
                shared.export_lora(adapter, Path(out) / name, format="tsd")
        weights.clear()

    def load_hook(models, _):  # adapters were restored by shared.load before prepare
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    global_step, skip_batches = 0, 0
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        global_step = adapters["unet"].num_steps
        skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
        accelerator.print(f"resumed from {resume_dir} at step {global_step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("tsd-sdxl", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    switch_record: dict[str, Any] = {}
    loss_log = _read_loss_log(output_dir) if resume_dir is not None else []
    loss_log = [row for row in loss_log if row["step"] <= global_step]
    bar = tqdm(total=max_steps, initial=global_step, desc=f"{args.method} steps", disable=not accelerator.is_local_main_process)
    validation_dir = output_dir / "validation"
    t_first_step: float | None = None  # perf_counter when this process's first optimizer step started
    for epoch in range(global_step // steps_per_epoch, epochs):
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        skip_batches = 0
        for model in trained:
            model.train()
        for batch in batches:
            if t_first_step is None:
                t_first_step = time.perf_counter()
            with accelerator.accumulate(*trained):
                per_sample = unet_loss(parts.unet, parts.scheduler, latents_for(batch),
                                       *unet_conditioning(condition, batch, accelerator.device, weight_dtype),
                                       snr_gamma=args.snr_gamma, noise_offset=args.noise_offset, reduce=False)
                is_class = batch["is_class"].to(per_sample.device)
                loss = per_sample[~is_class].mean()
                if is_class.any():
                    loss = loss + args.prior_loss_weight * per_sample[is_class].mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_([p for g in groups for p in g["params"]], args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            for name, adapter in adapters.items():
                if adapter.step(optimizer):
                    switch_record[name] = _check_switch_agrees(accelerator, adapter)
                    if accelerator.is_main_process:
                        bar.write(f"step {global_step}: dash switch of {name} done ({len(adapter.dash_layers)} layers, "
                                  f"identical on {accelerator.num_processes} process(es))")
            loss_value = accelerator.gather(loss.detach()).mean().item()
            loss_log.append({"step": global_step, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0],
                             "elapsed": time.perf_counter() - t_first_step})
            accelerator.log({k: loss_log[-1][k] for k in ("loss", "lr")}, step=global_step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if global_step % args.checkpointing_steps == 0 and global_step < max_steps:
                if accelerator.is_main_process:  # first: a resume keeps the rows up to its checkpoint
                    _write_loss_log(output_dir, loss_log)
                save_training_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                run_validation(parts, base, args, accelerator, global_step, validation_dir, evaluator)
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
        if args.validation_epochs and (epoch + 1) % args.validation_epochs == 0 and accelerator.is_main_process:
            run_validation(parts, base, args, accelerator, global_step, validation_dir, evaluator)
    bar.close()

    accelerator.wait_for_everyone()
    # the live adapters are returned for in-process callers (tests, notebooks); the files are the product
    summary: dict[str, Any] = {"steps": global_step, "output_dir": str(output_dir), "base": base, "adapters": adapters}
    if accelerator.is_main_process:
        summary.update(_finish(args, base, adapters, parts, accelerator, output_dir, validation_dir, loss_log, evaluator))
        if switch_record:
            atomic_write_json(output_dir / "dash_switch.json", switch_record)
    accelerator.end_training()
    return summary


def _check_switch_agrees(accelerator, adapter) -> dict[str, Any]:
    """Gather a fingerprint of the selected directions from every process; raise if any differs."""
    dash = [adapter.dash_term(name) for name in adapter.dash_layers]
    fingerprint = torch.stack([
        torch.cat([d.indices.double() for d in dash]).sum(),
        sum(d.U.double().sum() + d.Vh.double().sum() for d in dash),
    ]).to(accelerator.device)
    every = accelerator.gather(fingerprint.unsqueeze(0)).cpu()
    if not torch.equal(every, every[:1].expand_as(every)):
        raise RuntimeError(f"the dash switch selected different directions on different processes: {every.tolist()}")
    return {"step": adapter.num_steps, "processes": accelerator.num_processes, "fingerprints": every.tolist()}


def unet_conditioning(condition, batch: dict[str, Any], device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt embeddings, pooled embeddings and SDXL time ids of ``batch`` on the UNet's device and dtype (what the
    training step and the data-driven inits feed it); ``condition`` maps prompts to (embeddings, pooled)."""
    embeds, pooled = condition(batch["prompts"])
    return embeds.to(dtype), pooled.to(dtype), batch["time_ids"].to(device, dtype)


@torch.no_grad()
def _statistics_batches(dataset, args, condition, latents_for, device: torch.device,
                        dtype: torch.dtype) -> list[dict[str, Any]]:
    """Instance batches for the data-driven inits: latents and conditioning as the training step feeds them."""
    out = []
    n = len(dataset)
    for i in range(args.statistics_batches):
        idx = [(i * args.train_batch_size + j) % n for j in range(args.train_batch_size)]
        batch = collate([dataset[k] for k in idx])
        embeds, pooled, time_ids = unet_conditioning(condition, batch, device, dtype)
        out.append({"i": i, "latents": latents_for(batch), "embeds": embeds, "pooled": pooled, "time_ids": time_ids})
    return out


def _finish(args, base, adapters, parts, accelerator, output_dir: Path, validation_dir: Path, loss_log,
            evaluator) -> dict[str, Any]:
    """Export, reports, logs and the final validation images (main process)."""
    fmt = args.output_format
    if fmt == "peft":
        for name, adapter in adapters.items():
            shared.export_lora(adapter, output_dir / name, format="peft", base_model_name_or_path=base)
    else:
        shared.export_lora(adapters, output_dir, format=fmt)
    for name, adapter in adapters.items():
        shared.export_lora(adapter, output_dir / "tsd_state" / name, format="tsd")
    rows = shared.tsd.report(adapters["unet"])
    shared.tsd.write_report_csv(rows, output_dir / "tsd_report.csv")
    shared.tsd.plot_change_rates(rows, output_dir / "tsd_report.png")
    _write_loss_log(output_dir, loss_log)
    import diffusers
    import peft
    import transformers

    record = {k: v for k, v in vars(args).items()}
    record.update(resolved_base=base, versions={"torch": torch.__version__, "diffusers": diffusers.__version__,
                                                 "transformers": transformers.__version__, "peft": peft.__version__})
    atomic_write_json(output_dir / "training_args.json", record)
    images, metrics = run_validation(parts, base, args, accelerator, adapters["unet"].num_steps, validation_dir,
                                     evaluator)
    return {"validation_images": [str(p) for p in images], "validation_metrics": metrics,
            "final_loss": loss_log[-1]["loss"] if loss_log else None}


def _write_loss_log(output_dir: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr", "elapsed"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(output_dir / "loss_log.csv", buf.getvalue())


def _read_loss_log(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "loss_log.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"]),
                 "elapsed": float(r["elapsed"]) if r.get("elapsed") else None} for r in csv.DictReader(f)]
