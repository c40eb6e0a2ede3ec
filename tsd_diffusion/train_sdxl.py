"""DreamBooth LoRA training for SDXL with any method of the tsd-lora core (LoRA-Dash by default).

Mirrors diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py`` (same flag names, accelerate for
everything device-related) with these differences: the adapter comes from :func:`shared.attach` (so
``--method`` picks lora, dash, lora_init, tsd, eva, lora_da, pissa or lora_ga), the dash switch counts
optimizer steps, the output is a folded standard LoRA that stock ``load_lora_weights`` reproduces exactly,
augmentation is redrawn every epoch, latents are cached per (image, augmentation), checkpoints hold only
the adapter state (not the frozen base) and a resumed run equals an uninterrupted one. What practitioners bring
from kohya and SimpleTuner is there under their names: aspect-ratio buckets (``tsd_diffusion.buckets``), caption
files, masked loss, EMA (``tsd_diffusion.ema``), Prodigy and Adafactor (``tsd_diffusion.optimizers``), a
text-embedding cache, and files with model-spec metadata (``tsd_diffusion.lora_metadata``); validations can score
the DreamBooth paper's DINO, CLIP-I and CLIP-T (``tsd_diffusion.fidelity``).

With no arguments it trains on the embedded default: a tiny pipeline of the SDXL architecture and a
subject the project draws itself (``tsd_diffusion.tiny``).

This module holds the command line (:func:`parse_args`, :func:`cli`), the resolved config
(:class:`SDXLTrainConfig`) and the run's three stages, :func:`setup` -> :func:`train_loop` -> :func:`finish`
(:func:`main` runs them). The frozen base and prompt encoding are in ``tsd_diffusion.models``, the loss in
``tsd_diffusion.loss``, validation in ``tsd_diffusion.validation``, and the plumbing shared with the text
trainer (accelerator, resume, checkpoint hooks, loss log) in ``tsd_common.training``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import shared
from shared.errors import InputError
from shared.io import atomic_write_json
from tsd_common.checkpoints import save_training_checkpoint
from tsd_common.launch import run_cli
from tsd_common.training import (
    check_switch_agrees,
    init_trackers,
    read_loss_log,
    register_adapter_hooks,
    start_training,
    write_loss_log,
    write_tsd_report,
)

from .buckets import BucketBatchSampler, Buckets, describe_assignment
from .class_images import missing_class_images, sample_class_images
from .data import (
    INTERPOLATIONS,
    DreamBoothDataset,
    LatentCache,
    collate,
    image_candidates,
    load_image,
    validate_resolution,
)
from .ema import EMA_FILE, AdapterEMA
from .evaluation import SubjectEvaluator, prompt_class
from .fidelity import FidelityScorer, check_model_source
from .lora_metadata import file_metadata, training_facts
from .loss import (
    latent_mask,
    prior_preservation_loss,
    sequential_batches,
    statistics_batches,
    statistics_loss,
    unet_conditioning,
    unet_loss,
)
from .mini_sdxl import CLASSES, MINI_NAME, materialize_replay_prior
from .models import PRECISIONS, TEXT_ENCODER_TARGETS, UNET_TARGETS, LatentSampler, PromptConditioner, SDXLParts
from .optimizers import OPTIMIZERS, OptimizerSettings
from .optimizers import make_optimizer as build_optimizer
from .tiny import EMBEDDED_NAME, make_subject_images, resolve_pretrained
from .validation import VALIDATION_INFERENCE_STEPS, ValidationSettings, run_validation

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
LOSS_LOG_COLUMNS = ["step", "loss", "lr", "elapsed"]
#: where ``--cache_text_encoder_outputs_to_disk`` keeps the embeddings, under ``<output_dir>/cache/``
TEXT_EMBEDDING_STORE = "text_embeddings.safetensors"
#: the trained (non-EMA) adapter's files under ``--use_ema``, under ``<output_dir>/``
NON_EMA_DIR = "non_ema"

#: the defaults of a run on an embedded base (flags the user gives win). The mini SDXL's are the recipe its study
#: measured to work (docs/mini_sdxl.md, "The default recipe and its metrics": text-encoder LoRA + a replay prior of
#: captioned real images of all classes with 10% empty prompts, lr 1e-3, 200 steps, 16 + 16 images per batch); the
#: random-weight tiny SDXL only exercises the plumbing.
EMBEDDED_DEFAULTS: dict[str, dict[str, Any]] = {
    MINI_NAME: dict(subject="car", instance_prompt="a photo of sks automobile", resolution=32, learning_rate=1e-3,
                    max_train_steps=200, train_text_encoder=True, text_encoder_lr=1e-3, with_prior_preservation=True,
                    class_prompt_dropout=0.1, num_class_images=1000, train_batch_size=16, num_validation_images=8,
                    random_flip=True, bucket_reso_steps=8),
    EMBEDDED_NAME: dict(subject="teapot", instance_prompt="a photo of sks teapot", resolution=64, learning_rate=1e-3,
                        max_train_steps=300, bucket_reso_steps=16),
}
#: what a flag is when neither the user nor an embedded default set it (diffusers' defaults; kohya's bucket step)
GENERIC_DEFAULTS: dict[str, Any] = dict(resolution=1024, learning_rate=1e-4, train_text_encoder=False,
                                        text_encoder_lr=5e-6, with_prior_preservation=False, class_prompt_dropout=0.0,
                                        num_class_images=100, train_batch_size=4, num_validation_images=4,
                                        random_flip=False, bucket_reso_steps=64)


def str2bool(text: str) -> bool:
    """diffusers' boolean flags are written ``--flag True``/``--flag=false``; accept those spellings."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# --------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: diffusers' DreamBooth flags plus the adapter's; unset defaults stay None until
    :meth:`SDXLTrainConfig.from_args` resolves them."""
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
      help="prior images; a metadata.jsonl ({\"file_name\", \"text\"} per line) gives each its own caption "
           "(a replay prior)")
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
    a("--caption_extension", default=".txt",
      help="a file <image stem><ext> beside an image is its caption (before metadata.jsonl, before the prompt)")
    a("--prepend_instance_prompt", action="store_true",
      help="train an image's own caption as '<instance_prompt> <caption>' (default: the caption as written)")
    a("--caption_dropout_rate", type=float, default=0.0, help="train this share of instance examples with ''")
    a("--enable_bucket", action="store_true", help="aspect-ratio buckets of about --resolution² pixels (kohya)")
    a("--min_bucket_reso", type=int, default=None, help="smallest bucket side; default --resolution / 4")
    a("--max_bucket_reso", type=int, default=None, help="largest bucket side; default 2 x --resolution")
    a("--bucket_reso_steps", type=int, default=None,
      help="bucket sides are multiples of this; default 64 (8 for the mini SDXL, 16 for the tiny one)")
    a("--bucket_no_upscale", action="store_true",
      help="bucket = the image's own size (scaled down to the area), never enlarged")
    a("--masked_loss", action="store_true",
      help="weight the loss by a mask: --mask_dir/<stem>.*, <stem>_mask.* beside the image, or its alpha channel")
    a("--mask_dir", default=None, help="a folder of loss masks named like the instance images (--masked_loss)")
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
    a("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit (--optimizer adamw)")
    a("--optimizer", default="adamw", type=str.lower, choices=list(OPTIMIZERS))
    a("--prodigy_beta3", type=float, default=None, help="Prodigy's beta3 (default: sqrt(beta2))")
    a("--prodigy_decouple", type=str2bool, nargs="?", const=True, default=True, help="AdamW-style weight decay")
    a("--prodigy_use_bias_correction", type=str2bool, nargs="?", const=True, default=True)
    a("--prodigy_safeguard_warmup", type=str2bool, nargs="?", const=True, default=True)
    a("--use_ema", action="store_true",
      help="EMA of the adapter's trainable tensors; validation and the exported files use it")
    a("--ema_decay", type=float, default=None, help="the EMA's decay (default 0.9999; needs --use_ema)")
    a("--logging_steps", type=int, default=10,
      help="read the loss back and log it every N steps (every step gets its loss-log row)")
    a("--gradient_checkpointing", action="store_true")
    a("--enable_xformers_memory_efficient_attention", action="store_true",
      help="xformers attention in the UNet (needs xformers and CUDA); without it PyTorch's SDPA is used")
    a("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    a("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs (faster, ~10 mantissa bits)")
    a("--cache_latents", action="store_true", help="VAE-encode each (image, augmentation) once")
    a("--cache_text_encoder_outputs", action="store_true",
      help="encode every caption once before training (frozen text encoders)")
    a("--cache_text_encoder_outputs_to_disk", action="store_true",
      help="also keep them in <output_dir>/cache/text_embeddings.safetensors (implies --cache_text_encoder_outputs)")
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
    a("--dash_lr_ratio", type=float, default=1.0, help="λ's learning rate as a multiple of the component's")
    a("--statistics_batches", type=int, default=8,
      help="batches the data-driven inits (eva, lora_da, lora_init, tsd) read per process (pooled: N× under DDP)")
    # validation, checkpoints, output
    a("--validation_prompt", action="append", default=None, help="repeat for several prompts")
    a("--num_validation_images", type=int, default=None, help="per prompt; default 4 (8 for the mini SDXL)")
    a("--validation_steps", type=int, default=None, help="validate every N steps (and always at the end)")
    a("--validation_epochs", type=int, default=None, help="validate after every N epochs (diffusers' spelling)")
    a("--validation_inference_steps", type=int, default=VALIDATION_INFERENCE_STEPS)
    a("--eval_dino_model", default=None,
      help="DINO ViT-S/16 or DINOv2 (transformers dir or hub id): each validation scores DINO vs the instance images")
    a("--eval_clip_model", default=None,
      help="a CLIP model (transformers dir or hub id): each validation scores CLIP-I and CLIP-T")
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


# ------------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class SDXLTrainConfig:
    """A run's settings, resolved once from the flags (:meth:`from_args`); the fields carry diffusers' flag names.

    ``embedded_subject`` is True when the subject photos are drawn by the project (no ``--instance_data_dir``:
    they go to ``<output_dir>/instance_images``).
    """

    # model
    pretrained_model_name_or_path: str
    pretrained_vae_model_name_or_path: str | None
    revision: str | None
    variant: str | None
    # data
    instance_data_dir: str
    instance_prompt: str
    class_data_dir: str | None
    class_prompt: str | None
    with_prior_preservation: bool
    prior_loss_weight: float
    num_class_images: int
    sample_batch_size: int
    prior_generation_precision: str | None
    class_prompt_dropout: float
    resolution: int
    center_crop: bool
    image_interpolation_mode: str
    random_flip: bool
    repeats: int
    dataloader_num_workers: int
    caption_extension: str
    prepend_instance_prompt: bool
    caption_dropout_rate: float
    enable_bucket: bool
    min_bucket_reso: int | None
    max_bucket_reso: int | None
    bucket_reso_steps: int
    bucket_no_upscale: bool
    masked_loss: bool
    mask_dir: str | None
    embedded_subject: bool
    # training
    train_batch_size: int
    gradient_accumulation_steps: int
    max_train_steps: int | None
    num_train_epochs: int
    learning_rate: float
    text_encoder_lr: float
    scale_lr: bool
    lr_scheduler: str
    lr_warmup_steps: int
    lr_num_cycles: int
    lr_power: float
    snr_gamma: float | None
    noise_offset: float
    max_grad_norm: float
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    use_8bit_adam: bool
    optimizer: str
    prodigy_beta3: float | None
    prodigy_decouple: bool
    prodigy_use_bias_correction: bool
    prodigy_safeguard_warmup: bool
    use_ema: bool
    ema_decay: float | None
    logging_steps: int
    gradient_checkpointing: bool
    enable_xformers_memory_efficient_attention: bool
    mixed_precision: str | None
    allow_tf32: bool
    cache_latents: bool
    cache_text_encoder_outputs: bool
    cache_text_encoder_outputs_to_disk: bool
    train_text_encoder: bool
    seed: int
    # adapter
    method: str
    rank: int
    lora_alpha: float
    lora_dropout: float
    dash_warmup_steps: int
    dash_directions: int
    dash_lr_ratio: float
    statistics_batches: int
    # validation, checkpoints, output
    validation_prompt: list[str]
    num_validation_images: int
    validation_steps: int | None
    validation_epochs: int | None
    validation_inference_steps: int
    eval_dino_model: str | None
    eval_clip_model: str | None
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None
    output_dir: str
    overwrite_output_dir: bool
    output_format: str
    report_to: str
    logging_dir: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SDXLTrainConfig:
        """Fill the defaults that depend on other flags (an embedded base's recipe, else diffusers' defaults; the
        validation prompts; alpha = rank) and reject bad input before any compute. ``args`` is left as it is;
        ``--local_rank`` is dropped (accelerate reads ``LOCAL_RANK``) and ``--output_kohya_format`` becomes
        ``output_format="kohya"``."""
        a = argparse.Namespace(**vars(args))
        embedded = EMBEDDED_DEFAULTS.get(a.pretrained_model_name_or_path, {})
        for name, generic in GENERIC_DEFAULTS.items():
            if getattr(a, name) is None:
                setattr(a, name, embedded.get(name, generic))
        if a.max_train_steps is None:
            a.max_train_steps = embedded.get("max_train_steps")
        validate_resolution(a.resolution)
        a.embedded_subject = a.instance_data_dir is None
        if a.embedded_subject:
            if not embedded:
                raise InputError("--instance_data_dir is required with a custom --pretrained_model_name_or_path")
            a.instance_data_dir = str(Path(a.output_dir) / "instance_images")
            a.instance_prompt = a.instance_prompt or embedded["instance_prompt"]
        if not a.instance_prompt:
            raise InputError("--instance_prompt is required (e.g. 'a photo of sks dog')")
        if a.with_prior_preservation:
            if not a.class_data_dir and a.pretrained_model_name_or_path != MINI_NAME:  # (the mini's: in setup())
                raise InputError("--with_prior_preservation needs --class_data_dir (and --class_prompt unless every "
                                 "class image has a caption in its metadata.jsonl)")
        elif a.class_data_dir or a.class_prompt:
            print("warning: --class_data_dir/--class_prompt are ignored without --with_prior_preservation")
            a.class_data_dir = a.class_prompt = None
        if a.rank <= 0:
            raise InputError(f"--rank must be > 0, got {a.rank}")
        if a.output_kohya_format:
            if a.output_format not in ("diffusers", "kohya"):
                raise InputError(f"--output_kohya_format contradicts --output_format {a.output_format}")
            a.output_format = "kohya"
        a.lora_alpha = float(a.lora_alpha or a.rank)
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "num_validation_images",
                     "num_class_images", "sample_batch_size", "repeats"):
            if getattr(a, name) <= 0:
                raise InputError(f"--{name} must be > 0")
        if not a.noise_offset >= 0:
            raise InputError(f"--noise_offset must be >= 0, got {a.noise_offset}")
        for name in ("max_train_steps", "validation_steps", "validation_epochs"):
            if getattr(a, name) is not None and getattr(a, name) <= 0:
                raise InputError(f"--{name} must be > 0")
        if a.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
            raise InputError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
                             "(without the flag the UNet uses PyTorch's scaled_dot_product_attention, "
                             "memory-efficient on GPUs)")
        check_new_flags(a)
        a.validation_prompt = a.validation_prompt or default_validation_prompts(
            a.instance_prompt, a.pretrained_model_name_or_path, a.embedded_subject)
        return cls(**{f.name: getattr(a, f.name) for f in dataclasses.fields(cls)})

    @property
    def optimizer_settings(self) -> OptimizerSettings:
        """What :func:`tsd_diffusion.optimizers.make_optimizer` reads."""
        return OptimizerSettings(self.optimizer, self.use_8bit_adam, self.adam_beta1, self.adam_beta2,
                                 self.adam_weight_decay, self.adam_epsilon, self.prodigy_beta3, self.prodigy_decouple,
                                 self.prodigy_use_bias_correction, self.prodigy_safeguard_warmup)

    @property
    def buckets(self) -> Buckets | None:
        """The aspect-ratio buckets (``--enable_bucket``), else None."""
        if not self.enable_bucket:
            return None
        return Buckets.build(self.resolution, self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps,
                             self.bucket_no_upscale)

    @property
    def validation(self) -> ValidationSettings:
        """What every validation draws."""
        return ValidationSettings(self.validation_prompt, self.num_validation_images, self.seed,
                                  self.validation_inference_steps, self.resolution)


def check_new_flags(a: argparse.Namespace) -> None:
    """Resolve and check the flags of bucketing, captions, masks, optimizers, EMA, caches, λ's learning rate,
    logging and the fidelity models (in place); every problem is an :class:`InputError` naming the flag."""
    if a.enable_bucket:
        a.min_bucket_reso = a.min_bucket_reso or max(a.bucket_reso_steps, a.resolution // 4 // a.bucket_reso_steps
                                                     * a.bucket_reso_steps)
        a.max_bucket_reso = a.max_bucket_reso or 2 * a.resolution
        Buckets.build(a.resolution, a.min_bucket_reso, a.max_bucket_reso, a.bucket_reso_steps, a.bucket_no_upscale)
    else:
        given = [f for f in ("min_bucket_reso", "max_bucket_reso", "bucket_no_upscale") if getattr(a, f)]
        if given:
            raise InputError(f"--{given[0]} needs --enable_bucket")
    if not a.caption_extension.startswith(".") or len(a.caption_extension) < 2:
        raise InputError(f"--caption_extension must look like '.txt', got {a.caption_extension!r}")
    if not 0 <= a.caption_dropout_rate < 1:
        raise InputError(f"--caption_dropout_rate must be in [0, 1), got {a.caption_dropout_rate}")
    if a.mask_dir and not a.masked_loss:
        raise InputError("--mask_dir needs --masked_loss")
    if a.mask_dir and not Path(a.mask_dir).expanduser().is_dir():
        raise InputError(f"--mask_dir {a.mask_dir} is not a directory")
    OptimizerSettings(a.optimizer, a.use_8bit_adam, prodigy_beta3=a.prodigy_beta3).check()
    if a.optimizer == "prodigy" and a.learning_rate < 0.1:
        print(f"warning: Prodigy estimates the step size itself; its --learning_rate is a multiplier, usually 1.0 "
              f"(got {a.learning_rate})")
    if a.ema_decay is not None and not a.use_ema:
        raise InputError("--ema_decay needs --use_ema")
    a.ema_decay = 0.9999 if a.ema_decay is None else a.ema_decay
    if not 0 < a.ema_decay < 1:
        raise InputError(f"--ema_decay must be in (0, 1), got {a.ema_decay}")
    a.cache_text_encoder_outputs = a.cache_text_encoder_outputs or a.cache_text_encoder_outputs_to_disk
    if a.cache_text_encoder_outputs and a.train_text_encoder:
        raise InputError("--cache_text_encoder_outputs contradicts --train_text_encoder (the encoders' outputs "
                         "change every step)")
    if not a.dash_lr_ratio > 0:
        raise InputError(f"--dash_lr_ratio must be > 0, got {a.dash_lr_ratio}")
    if a.logging_steps <= 0:
        raise InputError(f"--logging_steps must be > 0, got {a.logging_steps}")
    for flag in ("eval_dino_model", "eval_clip_model"):
        check_model_source(f"--{flag}", getattr(a, flag))


def default_validation_prompts(instance_prompt: str, base_name: str, embedded_subject: bool) -> list[str]:
    """The subject prompt, plus for the mini SDXL the plain class prompt and another class (drift checks), or for
    the tiny one a recontextualisation."""
    if base_name == MINI_NAME:
        cls = prompt_class(instance_prompt, CLASSES)
        if cls is not None:
            other = "dog" if cls != "dog" else "cat"
            return [instance_prompt, f"a photo of a {cls}", f"a photo of a {other}"]
        return [instance_prompt]
    if embedded_subject:
        return [instance_prompt, f"{instance_prompt} on a beach", f"a photo of {instance_prompt.split()[-1]}"]
    return [instance_prompt]


def adapter_config(config: SDXLTrainConfig, targets: list[str], method: str | None = None,
                   train_size: int | None = None) -> shared.AdapterConfig:
    """The adapter's config; ``train_size`` (the training set's length) is LoRA-DA's population N."""
    return shared.AdapterConfig(
        method=method or config.method, r=config.rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
        target_modules=targets, dash_warmup_steps=config.dash_warmup_steps, dash_directions=config.dash_directions,
        dash_lr_ratio=config.dash_lr_ratio,
        seed=config.seed, eva_max_batches=config.statistics_batches, lora_init_steps=config.statistics_batches,
        lora_ga_batches=config.statistics_batches,
        lora_da_num_samples=config.statistics_batches * config.train_batch_size, lora_da_population=train_size,
    )


# ------------------------------------------------------------------------------------------------------- setup
@dataclass
class SDXLRun:
    """A run after :func:`setup`: everything the loop and :func:`finish` use.

    ``config`` has ``--scale_lr`` and the mini SDXL's replay prior applied; ``trained`` (the UNet, and the text
    encoders when they train), ``optimizer`` and ``lr_scheduler`` are prepared by accelerate, and so is ``loader``
    unless it draws from the bucket schedule (:class:`tsd_diffusion.buckets.BucketBatchSampler`, which shards
    itself); ``step`` is the optimizer steps done (the resumed step, or 0) and ``loss_log`` their rows; ``ema`` the
    adapters' EMA (``--use_ema``) and ``fidelity`` the DINO/CLIP scorer (``--eval_*_model``).
    """

    config: SDXLTrainConfig
    accelerator: Any
    base: str
    parts: SDXLParts
    dataset: DreamBoothDataset
    adapters: dict[str, shared.Adapter]
    trained: list[torch.nn.Module]
    params: list[torch.nn.Parameter]
    optimizer: Any
    loader: Any
    lr_scheduler: Any
    condition: PromptConditioner
    latents: LatentSampler
    weight_dtype: torch.dtype
    evaluator: SubjectEvaluator | None
    steps_per_epoch: int
    max_steps: int
    step: int
    loss_log: list[dict[str, Any]]
    ema: AdapterEMA | None = None
    fidelity: FidelityScorer | None = None
    validated: tuple[int, tuple[list[Path], list[dict[str, Any]]]] | None = None  # the last validation's step, result

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def validate(self) -> tuple[list[Path], list[dict[str, Any]]]:
        """Validation images (and metrics) at the current step into ``<output_dir>/validation``, with the EMA
        weights under ``--use_ema``; once per step (the final validation reuses one done at the last step)."""
        if self.validated is None or self.validated[0] != self.step:
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                result = run_validation(self.parts, self.accelerator, self.config.validation, self.step,
                                        self.output_dir / "validation", self.evaluator, self.fidelity)
            self.validated = (self.step, result)
        return self.validated[1]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation and shuffle (or bucket schedule)."""
        self.dataset.set_epoch(epoch)
        sampler = self.loader.batch_sampler
        (sampler if isinstance(sampler, BucketBatchSampler) else self.loader).set_epoch(epoch)


def make_dataset(config: SDXLTrainConfig) -> DreamBoothDataset:
    """The training set: the instance images (repeated), and the class images under prior preservation."""
    return DreamBoothDataset(
        config.instance_data_dir, config.instance_prompt, config.resolution, config.center_crop, config.random_flip,
        class_dir=config.class_data_dir, class_prompt=config.class_prompt, seed=config.seed,
        num_class_images=config.num_class_images if config.with_prior_preservation else None,
        class_prompt_dropout=config.class_prompt_dropout, interpolation=config.image_interpolation_mode,
        repeats=config.repeats, caption_extension=config.caption_extension,
        prepend_instance_prompt=config.prepend_instance_prompt, caption_dropout_rate=config.caption_dropout_rate,
        buckets=config.buckets, masked_loss=config.masked_loss, mask_dir=config.mask_dir,
    )


def prepare_data(config: SDXLTrainConfig, accelerator: Any) -> tuple[SDXLTrainConfig, int, DreamBoothDataset | None]:
    """The data, checked before any model loads: the embedded subject's photos are drawn (main process), the mini
    SDXL's replay prior is built (once, in the cache), the class images to sample are counted.

    Returns the config with the class dir in it, the number of class images to sample, and the dataset (every
    image decoded), or None while class images are missing (it is built once they are sampled).
    """
    if accelerator.is_main_process and config.embedded_subject:
        make_subject_images(config.instance_data_dir, n=5, size=max(96, config.resolution), seed=config.seed,
                            subject=EMBEDDED_DEFAULTS[config.pretrained_model_name_or_path]["subject"])
    accelerator.wait_for_everyone()
    image_candidates(config.instance_data_dir, "instance")  # a missing or empty dir is named before anything is built
    if config.with_prior_preservation and not config.class_data_dir:  # the mini SDXL's replay prior (built, locked)
        config = dataclasses.replace(config, class_data_dir=str(materialize_replay_prior()))
    to_sample = missing_class_images(config.class_data_dir if config.with_prior_preservation else None,
                                     config.num_class_images, config.class_prompt, config.instance_data_dir)
    if to_sample:  # the instance side (captions, buckets, masks) is checked before the base loads to sample
        make_dataset(dataclasses.replace(config, with_prior_preservation=False, class_data_dir=None,
                                         class_prompt=None))
    return config, to_sample, None if to_sample else make_dataset(config)


def check_resume(config: SDXLTrainConfig, resume_dir: Path) -> None:
    """Refuse, before anything loads, a resume whose checkpoint cannot continue this run exactly: another
    ``--dash_lr_ratio`` (the optimizer's restored groups would keep the old one), or ``--use_ema`` without the EMA
    state in the checkpoint."""
    from safetensors import safe_open

    with safe_open(str(resume_dir / "unet" / shared.native.NATIVE_WEIGHT_NAME), framework="pt") as f:
        saved = json.loads((f.metadata() or {}).get("tsd_config", "{}"))
    ratio = saved.get("dash_lr_ratio", 1.0)
    if ratio != config.dash_lr_ratio:
        raise InputError(f"--resume_from_checkpoint {resume_dir} was trained with --dash_lr_ratio {ratio}, not "
                         f"{config.dash_lr_ratio}: resume with the same ratio")
    if config.use_ema and not (resume_dir / EMA_FILE).is_file():
        raise InputError(f"--resume_from_checkpoint {resume_dir} holds no EMA state ({EMA_FILE}): it was saved "
                         "without --use_ema")


def load_base(config: SDXLTrainConfig, base: str, accelerator: Any, weight_dtype: torch.dtype,
              to_sample: int) -> SDXLParts:
    """The frozen base on this process's device at the training precision, after the ``to_sample`` missing class
    images are sampled from it, or, under another ``--prior_generation_precision``, from a base loaded for that
    alone and freed before the training one loads."""
    sample_dtype = PRECISIONS.get(config.prior_generation_precision or accelerator.mixed_precision, torch.float32)
    if to_sample and sample_dtype != weight_dtype:
        sample_class_images_from(_parts(config, base).place(accelerator.device, sample_dtype), config, accelerator,
                                 to_sample)
        to_sample = 0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the sampling base's cached blocks back before the training base loads
    parts = _parts(config, base).place(accelerator.device, weight_dtype)
    if to_sample:  # with the frozen base at the training precision, before any adapter is attached
        sample_class_images_from(parts, config, accelerator, to_sample)
    if config.enable_xformers_memory_efficient_attention:
        parts.unet.enable_xformers_memory_efficient_attention()
    if config.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for enc in parts.text_encoders:
                enc.gradient_checkpointing_enable()
    return parts


def _parts(config: SDXLTrainConfig, base: str) -> SDXLParts:
    return SDXLParts(base, revision=config.revision, variant=config.variant,
                     vae=config.pretrained_vae_model_name_or_path)


def sample_class_images_from(parts: SDXLParts, config: SDXLTrainConfig, accelerator: Any, count: int) -> None:
    """Sample ``count`` class images of ``--class_prompt`` from ``parts``' pipeline into ``--class_data_dir``."""
    sample_class_images(parts.pipeline(accelerator), accelerator, config.class_data_dir, config.class_prompt, count,
                        batch_size=config.sample_batch_size, resolution=config.resolution, seed=config.seed)


def make_loader(config: SDXLTrainConfig, dataset: DreamBoothDataset, accelerator: Any) -> tuple[Any, bool]:
    """The training loader and whether accelerate must prepare it: a seeded shuffle that accelerate shards, or,
    with ``--enable_bucket``, the bucket schedule, which every process draws its own share of."""
    if config.enable_bucket:
        sampler = BucketBatchSampler(dataset.item_buckets, config.train_batch_size, config.seed,
                                     num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                     multiple_of=config.gradient_accumulation_steps)
        # its own generator: a DataLoader iterator draws a seed from it, not from the global RNG that the noise and
        # timesteps come from (a resumed run restores that RNG and then starts a new iterator)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                           num_workers=config.dataloader_num_workers,
                                           generator=torch.Generator().manual_seed(config.seed)), False
    return torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, shuffle=True,
                                       collate_fn=collate, num_workers=config.dataloader_num_workers,
                                       generator=torch.Generator().manual_seed(config.seed)), True


def attach_adapters(config: SDXLTrainConfig, parts: SDXLParts, dataset: DreamBoothDataset,
                    condition: PromptConditioner, latents: LatentSampler, accelerator: Any,
                    resume_dir: Path | None) -> dict[str, shared.Adapter]:
    """The adapters by diffusers component name: restored exactly from a checkpoint, or attached (the data-driven
    inits read instance batches fed as the training step feeds them, in bucket-schedule order under
    ``--enable_bucket``; the text encoders get lora or dash)."""
    if resume_dir is not None:
        adapters = {"unet": shared.load(parts.unet, resume_dir / "unet")}
        if config.train_text_encoder:
            for name, enc in zip(TEXT_ENCODERS, parts.text_encoders, strict=True):
                adapters[name] = shared.load(enc, resume_dir / name)
        return adapters
    method = shared.METHODS[config.method]
    stats = None
    if method.needs_data:  # every process's batches; statistics_batches picks this process's share
        total = config.statistics_batches * accelerator.num_processes
        if config.enable_bucket:
            schedule = BucketBatchSampler(dataset.item_buckets, config.train_batch_size, config.seed).schedule(0)
            index_batches = [schedule[i % len(schedule)] for i in range(total)]
        else:
            index_batches = sequential_batches(len(dataset), total, config.train_batch_size)
        stats = statistics_batches(dataset, index_batches, condition, latents, accelerator.device, latents.dtype,
                                   accelerator.process_index, accelerator.num_processes)
    unet_config = adapter_config(config, UNET_TARGETS, train_size=len(dataset))
    adapters = {"unet": shared.attach(parts.unet, unet_config, data=stats,
                                      forward_fn=statistics_loss(parts.scheduler, config.seed, accelerator.device),
                                      progress=accelerator.is_main_process)}
    if config.train_text_encoder:
        te_config = adapter_config(config, TEXT_ENCODER_TARGETS, "dash" if method.dash_phase else "lora")
        for name, enc in zip(TEXT_ENCODERS, parts.text_encoders, strict=True):
            adapters[name] = shared.attach(enc, te_config)
    return adapters


def make_optimizer(config: SDXLTrainConfig,
                   adapters: dict[str, shared.Adapter]) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """``--optimizer`` over the UNet adapter at ``--learning_rate`` and the text encoders' at ``--text_encoder_lr``,
    each with λ at ``--dash_lr_ratio`` times that (``shared.Adapter.param_groups``); returns it and the parameters
    whose gradients are clipped."""
    groups = adapters["unet"].param_groups(config.learning_rate)
    for name in TEXT_ENCODERS:
        if name in adapters:
            groups += adapters[name].param_groups(config.text_encoder_lr)
    optimizer = build_optimizer(config.optimizer_settings, groups, config.learning_rate)
    return optimizer, [p for g in groups for p in g["params"]]


def load_fidelity(config: SDXLTrainConfig, accelerator: Any) -> FidelityScorer | None:
    """The DINO/CLIP scorer of ``--eval_dino_model``/``--eval_clip_model`` on the main process, with the instance
    images (checked by :func:`prepare_data`) as references; None without either flag."""
    if not (config.eval_dino_model or config.eval_clip_model) or not accelerator.is_main_process:
        return None
    photos = image_candidates(config.instance_data_dir, "instance", caption_extension=config.caption_extension)
    return FidelityScorer([load_image(p) for p in photos], dino=config.eval_dino_model, clip=config.eval_clip_model,
                          device=accelerator.device)


def setup(config: SDXLTrainConfig, accelerator: Any, resume_dir: Path | None) -> SDXLRun:
    """Everything before the first step: the data (checked before any model loads), the fidelity models, the frozen
    base, the class images, the cached text embeddings, the adapters (restored from ``resume_dir``, or attached),
    the optimizer, loader and scheduler prepared, the EMA, the checkpoint hooks, the resumed state and loss log,
    the trackers."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if config.scale_lr:
        config = dataclasses.replace(config, learning_rate=config.learning_rate * config.gradient_accumulation_steps
                                     * config.train_batch_size * accelerator.num_processes)
    if resume_dir is not None:
        check_resume(config, resume_dir)
    config, to_sample, dataset = prepare_data(config, accelerator)
    set_seed(config.seed)
    base = resolve_pretrained(config.pretrained_model_name_or_path)
    weight_dtype = PRECISIONS.get(accelerator.mixed_precision, torch.float32)
    fidelity = load_fidelity(config, accelerator)
    parts = load_base(config, base, accelerator, weight_dtype, to_sample)
    if dataset is None:
        dataset = make_dataset(config)
    if dataset.image_buckets is not None:
        accelerator.print(describe_assignment([p.name for p in dataset.instance_images], dataset.image_buckets))
    evaluator = (SubjectEvaluator.for_base(base, dataset.instance_images, config.resolution)
                 if accelerator.is_main_process else None)
    # frozen text conditioning is computed once per prompt unless the text encoders train
    store = (Path(config.output_dir) / "cache" / TEXT_EMBEDDING_STORE if config.cache_text_encoder_outputs_to_disk
             else None)
    condition = PromptConditioner(parts, config.train_text_encoder, store)
    if config.cache_text_encoder_outputs:
        counts = condition.precompute(dataset.prompts(), write=accelerator.is_main_process)
        accelerator.print(f"text-embedding cache: {counts['loaded']} prompts loaded, {counts['encoded']} encoded")
    latents = LatentSampler(parts, accelerator.device, weight_dtype, LatentCache() if config.cache_latents else None)
    if config.dataloader_num_workers == 0:  # worker processes would hold stale copies of the cache
        dataset.latent_cache = latents.cache
    adapters = attach_adapters(config, parts, dataset, condition, latents, accelerator, resume_dir)
    optimizer, params = make_optimizer(config, adapters)
    loader, shard_by_accelerate = make_loader(config, dataset, accelerator)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=config.lr_num_cycles, power=config.lr_power)
    trained = [parts.unet] + ([*parts.text_encoders] if config.train_text_encoder else [])
    if shard_by_accelerate:
        *trained, optimizer, loader, lr_scheduler = accelerator.prepare(*trained, optimizer, loader, lr_scheduler)
    else:
        *trained, optimizer, lr_scheduler = accelerator.prepare(*trained, optimizer, lr_scheduler)
    parts.unet = trained[0]
    if config.train_text_encoder:
        parts.text_encoders = trained[1:]
    ema = AdapterEMA(adapters, config.ema_decay) if config.use_ema else None
    register_adapter_hooks(accelerator, adapters,
                           save_extra=(lambda checkpoint: ema.save(checkpoint / EMA_FILE)) if ema else None)
    step, loss_log = 0, []
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        step = adapters["unet"].num_steps
        if ema is not None:
            ema.load(resume_dir / EMA_FILE)
        loss_log = [row for row in read_loss_log(Path(config.output_dir)) if row["step"] <= step]
        accelerator.print(f"resumed from {resume_dir} at step {step}")
    init_trackers(accelerator, "tsd-sdxl", dataclasses.asdict(config))
    return SDXLRun(config, accelerator, base, parts, dataset, adapters, trained, params, optimizer, loader,
                   lr_scheduler, condition, latents, weight_dtype, evaluator, steps_per_epoch, max_steps, step,
                   loss_log, ema, fidelity)


# ------------------------------------------------------------------------------------------------------- train
class LossLogger:
    """The loss log, read back from the device every ``--logging_steps`` steps instead of every step.

    :meth:`add` keeps the step's loss as a device tensor (no host sync); :meth:`flush` gathers the pending losses of
    every process in one collective, averages them per step, appends one ``loss_log.csv`` row per step, sends them
    to the trackers and the progress bar. ``elapsed`` is the host clock when the step was issued: on a GPU the
    rows between two flushes may be ahead of the device, the row of a flush is not.
    """

    def __init__(self, run: SDXLRun, bar: Any) -> None:
        self.run, self.bar = run, bar
        self.pending: list[tuple[int, torch.Tensor, float, float]] = []

    def add(self, step: int, loss: torch.Tensor, lr: float, elapsed: float) -> None:
        self.pending.append((step, loss.detach().float().reshape(()), lr, elapsed))
        if step % self.run.config.logging_steps == 0:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        accelerator = self.run.accelerator
        losses = accelerator.gather(torch.stack([p[1] for p in self.pending])[None]).mean(0).tolist()
        for (step, _, lr, elapsed), loss in zip(self.pending, losses, strict=True):
            self.run.loss_log.append({"step": step, "loss": loss, "lr": lr, "elapsed": elapsed})
            accelerator.log({"loss": loss, "lr": lr}, step=step)
        self.bar.update(len(self.pending))
        self.bar.set_postfix(loss=f"{losses[-1]:.4f}")
        self.pending.clear()


def train_loop(run: SDXLRun) -> dict[str, Any]:
    """Optimizer steps from ``run.step`` to ``run.max_steps``; returns the dash switch records by component.

    Every step: the denoising loss of the batch (the prior term weighted by ``--prior_loss_weight``, the pixels
    weighted by their masks under ``--masked_loss``), then ``adapter.step`` (at the switch every process's selection
    is checked equal) and the EMA's step; the loss stays on the device until the loss logger's flush
    (:class:`LossLogger`). Every ``--checkpointing_steps`` the loss log and a checkpoint are written; validation
    runs every ``--validation_steps`` and after every ``--validation_epochs``. A resumed run skips the batches its
    checkpoint had consumed in the current epoch, so it sees the batches an uninterrupted run would.
    """
    from tqdm.auto import tqdm

    config, accelerator = run.config, run.accelerator
    switch_record: dict[str, Any] = {}
    skip_batches = (run.step % run.steps_per_epoch) * config.gradient_accumulation_steps
    bar = tqdm(total=run.max_steps, initial=run.step, desc=f"{config.method} steps",
               disable=not accelerator.is_local_main_process)
    log = LossLogger(run, bar)
    t_first_step: float | None = None  # perf_counter when this process's first optimizer step started
    for model in run.trained:  # (a validation puts them back in train mode itself)
        model.train()
    for epoch in range(run.step // run.steps_per_epoch, math.ceil(run.max_steps / run.steps_per_epoch)):
        run.set_epoch(epoch)
        batches = accelerator.skip_first_batches(run.loader, skip_batches) if skip_batches else run.loader
        skip_batches = 0
        for batch in batches:
            if t_first_step is None:
                t_first_step = time.perf_counter()
            with accelerator.accumulate(*run.trained):
                latents = run.latents(batch)
                mask = latent_mask(batch["masks"], latents) if batch["masks"] is not None else None
                per_sample = unet_loss(run.parts.unet, run.parts.scheduler, latents,
                                       *unet_conditioning(run.condition, batch, accelerator.device, run.weight_dtype),
                                       snr_gamma=config.snr_gamma, noise_offset=config.noise_offset, reduce=False,
                                       mask=mask)
                loss = prior_preservation_loss(per_sample, batch["is_class"], config.prior_loss_weight)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(run.params, config.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            run.step += 1
            for name, adapter in run.adapters.items():
                if adapter.step(run.optimizer):
                    switch_record[name] = check_switch_agrees(accelerator, adapter)
                    if accelerator.is_main_process:
                        bar.write(f"step {run.step}: dash switch of {name} done ({len(adapter.dash_layers)} layers, "
                                  f"identical on {accelerator.num_processes} process(es))")
            if run.ema is not None:
                run.ema.step()
            log.add(run.step, loss, run.lr_scheduler.get_last_lr()[0], time.perf_counter() - t_first_step)
            if run.step % config.checkpointing_steps == 0 and run.step < run.max_steps:
                log.flush()
                if accelerator.is_main_process:  # first: a resume keeps the rows up to its checkpoint
                    write_loss_log(run.output_dir, run.loss_log, LOSS_LOG_COLUMNS)
                save_training_checkpoint(accelerator, run.output_dir, run.step, config.checkpoints_total_limit)
            if config.validation_steps and run.step % config.validation_steps == 0 and accelerator.is_main_process:
                run.validate()
            if run.step >= run.max_steps:
                break
        if run.step >= run.max_steps:
            break
        if config.validation_epochs and (epoch + 1) % config.validation_epochs == 0 and accelerator.is_main_process:
            run.validate()
    log.flush()
    bar.close()
    return switch_record


# ------------------------------------------------------------------------------------------------------ finish
def finish(run: SDXLRun, switch_record: dict[str, Any]) -> dict[str, Any]:
    """Write the outputs (main process) and end the trackers; returns the summary: steps, output dir, base, the
    live adapters (for in-process callers: tests, notebooks; the files are the product; they hold the trained,
    not the EMA, tensors) and the EMA, and, from the main process, the final validation images and metrics and the
    final loss."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"steps": run.step, "output_dir": str(run.output_dir), "base": run.base,
                               "adapters": run.adapters, "ema": run.ema}
    if accelerator.is_main_process:
        summary.update(write_outputs(run))
        if switch_record:
            atomic_write_json(run.output_dir / "dash_switch.json", switch_record)
    accelerator.end_training()
    return summary


def export_adapters(run: SDXLRun, out: Path) -> None:
    """The LoRA of ``--output_format`` into ``out``, with its header metadata (:mod:`tsd_diffusion.lora_metadata`),
    and each adapter's native state under ``out/tsd_state/``."""
    config = run.config
    facts = training_facts(config, run.base, run.step, run.parts.scheduler.config.prediction_type)
    meta = file_metadata(facts, Path(config.output_dir).name, config.output_format)
    if config.output_format == "peft":
        for name, adapter in run.adapters.items():
            shared.export_lora(adapter, out / name, format="peft", base_model_name_or_path=run.base, metadata=meta)
    else:
        shared.export_lora(run.adapters, out, format=config.output_format, metadata=meta)
    for name, adapter in run.adapters.items():
        shared.export_lora(adapter, out / "tsd_state" / name, format="tsd")


def write_outputs(run: SDXLRun) -> dict[str, Any]:
    """The exported LoRA (``--output_format``), each adapter's native state under ``tsd_state/``, the TSD report,
    ``loss_log.csv``, ``training_args.json`` (the resolved config, the base and library versions) and the final
    validation. Under ``--use_ema`` these are the EMA weights, and the trained ones go to ``non_ema/`` (the LoRA
    and ``tsd_state/``)."""
    import diffusers
    import peft
    import transformers

    config, out = run.config, run.output_dir
    if run.ema is not None:
        export_adapters(run, out / NON_EMA_DIR)
    with run.ema.applied() if run.ema is not None else contextlib.nullcontext():
        export_adapters(run, out)
        write_tsd_report(run.adapters["unet"], out)
    write_loss_log(out, run.loss_log, LOSS_LOG_COLUMNS)
    record = dataclasses.asdict(config)
    record.update(resolved_base=run.base, versions={"torch": torch.__version__, "diffusers": diffusers.__version__,
                                                     "transformers": transformers.__version__,
                                                     "peft": peft.__version__})
    atomic_write_json(out / "training_args.json", record)
    images, metrics = run.validate()
    return {"validation_images": [str(p) for p in images], "validation_metrics": metrics,
            "final_loss": run.loss_log[-1]["loss"] if run.loss_log else None}


# -------------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train, export and validate: the config is resolved, then :func:`setup` -> :func:`train_loop` ->
    :func:`finish`. Returns the summary."""
    config = SDXLTrainConfig.from_args(args)
    accelerator, resume_dir = start_training(
        output_dir=Path(config.output_dir), logging_dir=config.logging_dir, report_to=config.report_to,
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        resume_from=config.resume_from_checkpoint, overwrite=config.overwrite_output_dir, checkpoint_marker="unet")
    run = setup(config, accelerator, resume_dir)
    return finish(run, train_loop(run))


def cli(argv: list[str] | None = None) -> None:
    """The ``tsd-train-sdxl`` command (``accelerate launch apps/train_sdxl.py``): a user error is one line on stderr
    and exit status 2 (:func:`tsd_common.launch.run_cli`)."""

    def train() -> None:
        summary = main(parse_args(argv))
        if summary.get("validation_images"):
            print(f"done: {summary['steps']} steps; adapter, validation images and reports in "
                  f"{summary['output_dir']}/")

    run_cli(train)
