"""DreamBooth LoRA training for SDXL with any method of the tsd-lora core (LoRA-Dash by default).

Mirrors diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py`` (same flag names, accelerate for
everything device-related) with these differences: the adapter comes from :func:`shared.attach` (so
``--method`` picks lora, dash, lora_init, tsd, eva, lora_da, pissa or lora_ga), the dash switch counts
optimizer steps, the output is a folded standard LoRA that stock ``load_lora_weights`` reproduces exactly,
augmentation is redrawn every epoch, latents are cached per (image, augmentation), checkpoints hold only
the adapter state (not the frozen base) and a resumed run equals an uninterrupted one.

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
import dataclasses
import importlib.util
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

from .class_images import missing_class_images, sample_class_images
from .data import INTERPOLATIONS, DreamBoothDataset, LatentCache, collate, image_candidates, validate_resolution
from .evaluation import SubjectEvaluator, prompt_class
from .loss import prior_preservation_loss, statistics_batches, statistics_loss, unet_conditioning, unet_loss
from .mini_sdxl import CLASSES, MINI_NAME, materialize_replay_prior
from .models import PRECISIONS, TEXT_ENCODER_TARGETS, UNET_TARGETS, LatentSampler, PromptConditioner, SDXLParts
from .tiny import EMBEDDED_NAME, make_subject_images, resolve_pretrained
from .validation import VALIDATION_INFERENCE_STEPS, ValidationSettings, run_validation

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
LOSS_LOG_COLUMNS = ["step", "loss", "lr", "elapsed"]

#: the defaults of a run on an embedded base (flags the user gives win). The mini SDXL's are the recipe its study
#: measured to work (docs/mini_sdxl.md, "The default recipe and its metrics": text-encoder LoRA + a replay prior of
#: captioned real images of all classes with 10% empty prompts, lr 1e-3, 200 steps, 16 + 16 images per batch); the
#: random-weight tiny SDXL only exercises the plumbing.
EMBEDDED_DEFAULTS: dict[str, dict[str, Any]] = {
    MINI_NAME: dict(subject="car", instance_prompt="a photo of sks automobile", resolution=32, learning_rate=1e-3,
                    max_train_steps=200, train_text_encoder=True, text_encoder_lr=1e-3, with_prior_preservation=True,
                    class_prompt_dropout=0.1, num_class_images=1000, train_batch_size=16, num_validation_images=8,
                    random_flip=True),
    EMBEDDED_NAME: dict(subject="teapot", instance_prompt="a photo of sks teapot", resolution=64, learning_rate=1e-3,
                        max_train_steps=300),
}
#: what a flag is when neither the user nor an embedded default set it (diffusers' defaults)
GENERIC_DEFAULTS: dict[str, Any] = dict(resolution=1024, learning_rate=1e-4, train_text_encoder=False,
                                        text_encoder_lr=5e-6, with_prior_preservation=False, class_prompt_dropout=0.0,
                                        num_class_images=100, train_batch_size=4, num_validation_images=4,
                                        random_flip=False)


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
    a("--statistics_batches", type=int, default=8,
      help="batches the data-driven inits (eva, lora_da, lora_init, tsd) read")
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
    gradient_checkpointing: bool
    enable_xformers_memory_efficient_attention: bool
    mixed_precision: str | None
    allow_tf32: bool
    cache_latents: bool
    train_text_encoder: bool
    seed: int
    # adapter
    method: str
    rank: int
    lora_alpha: float
    lora_dropout: float
    dash_warmup_steps: int
    dash_directions: int
    statistics_batches: int
    # validation, checkpoints, output
    validation_prompt: list[str]
    num_validation_images: int
    validation_steps: int | None
    validation_epochs: int | None
    validation_inference_steps: int
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
        if a.use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise InputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        a.validation_prompt = a.validation_prompt or default_validation_prompts(
            a.instance_prompt, a.pretrained_model_name_or_path, a.embedded_subject)
        return cls(**{f.name: getattr(a, f.name) for f in dataclasses.fields(cls)})

    @property
    def validation(self) -> ValidationSettings:
        """What every validation draws."""
        return ValidationSettings(self.validation_prompt, self.num_validation_images, self.seed,
                                  self.validation_inference_steps, self.resolution)


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
        seed=config.seed, eva_max_batches=config.statistics_batches, lora_init_steps=config.statistics_batches,
        lora_ga_batches=config.statistics_batches,
        lora_da_num_samples=config.statistics_batches * config.train_batch_size, lora_da_population=train_size,
    )


# ------------------------------------------------------------------------------------------------------- setup
@dataclass
class SDXLRun:
    """A run after :func:`setup`: everything the loop and :func:`finish` use.

    ``config`` has ``--scale_lr`` and the mini SDXL's replay prior applied; ``trained`` (the UNet, and the text
    encoders when they train), ``optimizer``, ``loader`` and ``lr_scheduler`` are prepared by accelerate; ``step``
    is the optimizer steps done (the resumed step, or 0) and ``loss_log`` their rows.
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

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    def validate(self) -> tuple[list[Path], list[dict[str, Any]]]:
        """Validation images (and metrics) at the current step into ``<output_dir>/validation``."""
        return run_validation(self.parts, self.accelerator, self.config.validation, self.step,
                              self.output_dir / "validation", self.evaluator)


def make_dataset(config: SDXLTrainConfig) -> DreamBoothDataset:
    """The training set: the instance images (repeated), and the class images under prior preservation."""
    return DreamBoothDataset(
        config.instance_data_dir, config.instance_prompt, config.resolution, config.center_crop, config.random_flip,
        class_dir=config.class_data_dir, class_prompt=config.class_prompt, seed=config.seed,
        num_class_images=config.num_class_images if config.with_prior_preservation else None,
        class_prompt_dropout=config.class_prompt_dropout, interpolation=config.image_interpolation_mode,
        repeats=config.repeats,
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
    return config, to_sample, None if to_sample else make_dataset(config)


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


def attach_adapters(config: SDXLTrainConfig, parts: SDXLParts, dataset: DreamBoothDataset,
                    condition: PromptConditioner, latents: LatentSampler, accelerator: Any,
                    resume_dir: Path | None) -> dict[str, shared.Adapter]:
    """The adapters by diffusers component name: restored exactly from a checkpoint, or attached (the data-driven
    inits read instance batches fed as the training step feeds them; the text encoders get lora or dash)."""
    if resume_dir is not None:
        adapters = {"unet": shared.load(parts.unet, resume_dir / "unet")}
        if config.train_text_encoder:
            for name, enc in zip(TEXT_ENCODERS, parts.text_encoders, strict=True):
                adapters[name] = shared.load(enc, resume_dir / name)
        return adapters
    method = shared.METHODS[config.method]
    stats = (statistics_batches(dataset, config.statistics_batches, config.train_batch_size, condition, latents,
                                accelerator.device, latents.dtype) if method.needs_data else None)
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
    """AdamW (8-bit with ``--use_8bit_adam``) over the UNet adapter at ``--learning_rate`` and the text encoders'
    at ``--text_encoder_lr``; returns it and the parameters whose gradients are clipped."""
    groups = [{"params": adapters["unet"].trainable_parameters(), "lr": config.learning_rate}]
    for name in TEXT_ENCODERS:
        if name in adapters:
            groups.append({"params": adapters[name].trainable_parameters(), "lr": config.text_encoder_lr})
    opt_cls = torch.optim.AdamW
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        opt_cls = bnb.optim.AdamW8bit
    # lr= also sets the optimizer's default, which diffusers' polynomial schedule reads as its starting lr
    optimizer = opt_cls(groups, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    return optimizer, [p for g in groups for p in g["params"]]


def setup(config: SDXLTrainConfig, accelerator: Any, resume_dir: Path | None) -> SDXLRun:
    """Everything before the first step: the data (checked before any model loads), the frozen base, the class
    images, the adapters (restored from ``resume_dir``, or attached), the optimizer, loader and scheduler prepared,
    the checkpoint hooks, the resumed state and loss log, the trackers."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if config.scale_lr:
        config = dataclasses.replace(config, learning_rate=config.learning_rate * config.gradient_accumulation_steps
                                     * config.train_batch_size * accelerator.num_processes)
    config, to_sample, dataset = prepare_data(config, accelerator)
    set_seed(config.seed)
    base = resolve_pretrained(config.pretrained_model_name_or_path)
    weight_dtype = PRECISIONS.get(accelerator.mixed_precision, torch.float32)
    parts = load_base(config, base, accelerator, weight_dtype, to_sample)
    if dataset is None:
        dataset = make_dataset(config)
    evaluator = (SubjectEvaluator.for_base(base, dataset.instance_images, config.resolution)
                 if accelerator.is_main_process else None)
    # frozen text conditioning is computed once per prompt unless the text encoders train
    condition = PromptConditioner(parts, config.train_text_encoder)
    latents = LatentSampler(parts, accelerator.device, weight_dtype, LatentCache() if config.cache_latents else None)
    adapters = attach_adapters(config, parts, dataset, condition, latents, accelerator, resume_dir)
    optimizer, params = make_optimizer(config, adapters)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, shuffle=True,
                                         collate_fn=collate, num_workers=config.dataloader_num_workers)
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=config.lr_num_cycles, power=config.lr_power)
    trained = [parts.unet] + ([*parts.text_encoders] if config.train_text_encoder else [])
    *trained, optimizer, loader, lr_scheduler = accelerator.prepare(*trained, optimizer, loader, lr_scheduler)
    parts.unet = trained[0]
    if config.train_text_encoder:
        parts.text_encoders = trained[1:]
    register_adapter_hooks(accelerator, adapters)
    step, loss_log = 0, []
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        step = adapters["unet"].num_steps
        loss_log = [row for row in read_loss_log(Path(config.output_dir)) if row["step"] <= step]
        accelerator.print(f"resumed from {resume_dir} at step {step}")
    init_trackers(accelerator, "tsd-sdxl", dataclasses.asdict(config))
    return SDXLRun(config, accelerator, base, parts, dataset, adapters, trained, params, optimizer, loader,
                   lr_scheduler, condition, latents, weight_dtype, evaluator, steps_per_epoch, max_steps, step,
                   loss_log)


# ------------------------------------------------------------------------------------------------------- train
def train_loop(run: SDXLRun) -> dict[str, Any]:
    """Optimizer steps from ``run.step`` to ``run.max_steps``; returns the dash switch records by component.

    Every step: the denoising loss of the batch (the prior term weighted by ``--prior_loss_weight``), then
    ``adapter.step`` (at the switch every process's selection is checked equal), a loss-log row and the trackers'
    loss and lr. Every ``--checkpointing_steps`` the loss log and a checkpoint are written; validation runs every
    ``--validation_steps`` and after every ``--validation_epochs``. A resumed run skips the batches its checkpoint
    had consumed in the current epoch, so it sees the batches an uninterrupted run would.
    """
    from tqdm.auto import tqdm

    config, accelerator = run.config, run.accelerator
    switch_record: dict[str, Any] = {}
    skip_batches = (run.step % run.steps_per_epoch) * config.gradient_accumulation_steps
    bar = tqdm(total=run.max_steps, initial=run.step, desc=f"{config.method} steps",
               disable=not accelerator.is_local_main_process)
    t_first_step: float | None = None  # perf_counter when this process's first optimizer step started
    for epoch in range(run.step // run.steps_per_epoch, math.ceil(run.max_steps / run.steps_per_epoch)):
        run.dataset.set_epoch(epoch)
        run.loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(run.loader, skip_batches) if skip_batches else run.loader
        skip_batches = 0
        for model in run.trained:
            model.train()
        for batch in batches:
            if t_first_step is None:
                t_first_step = time.perf_counter()
            with accelerator.accumulate(*run.trained):
                per_sample = unet_loss(run.parts.unet, run.parts.scheduler, run.latents(batch),
                                       *unet_conditioning(run.condition, batch, accelerator.device, run.weight_dtype),
                                       snr_gamma=config.snr_gamma, noise_offset=config.noise_offset, reduce=False)
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
            loss_value = accelerator.gather(loss.detach()).mean().item()
            run.loss_log.append({"step": run.step, "loss": loss_value, "lr": run.lr_scheduler.get_last_lr()[0],
                                 "elapsed": time.perf_counter() - t_first_step})
            accelerator.log({k: run.loss_log[-1][k] for k in ("loss", "lr")}, step=run.step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if run.step % config.checkpointing_steps == 0 and run.step < run.max_steps:
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
    bar.close()
    return switch_record


# ------------------------------------------------------------------------------------------------------ finish
def finish(run: SDXLRun, switch_record: dict[str, Any]) -> dict[str, Any]:
    """Write the outputs (main process) and end the trackers; returns the summary: steps, output dir, base, the
    live adapters (for in-process callers: tests, notebooks; the files are the product) and, from the main
    process, the final validation images and metrics and the final loss."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"steps": run.step, "output_dir": str(run.output_dir), "base": run.base,
                               "adapters": run.adapters}
    if accelerator.is_main_process:
        summary.update(write_outputs(run))
        if switch_record:
            atomic_write_json(run.output_dir / "dash_switch.json", switch_record)
    accelerator.end_training()
    return summary


def write_outputs(run: SDXLRun) -> dict[str, Any]:
    """The exported LoRA (``--output_format``), each adapter's native state under ``tsd_state/``, the TSD report,
    ``loss_log.csv``, ``training_args.json`` (the resolved config, the base and library versions) and the final
    validation."""
    import diffusers
    import peft
    import transformers

    config, out = run.config, run.output_dir
    if config.output_format == "peft":
        for name, adapter in run.adapters.items():
            shared.export_lora(adapter, out / name, format="peft", base_model_name_or_path=run.base)
    else:
        shared.export_lora(run.adapters, out, format=config.output_format)
    for name, adapter in run.adapters.items():
        shared.export_lora(adapter, out / "tsd_state" / name, format="tsd")
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
