"""Adapter configuration: one dataclass for every method of the core.

The shared fields mirror peft's ``LoraConfig`` (``r``, ``alpha``, ``dropout``, ``target_modules``);
the per-method fields are prefixed with the method they belong to. ``validate`` checks everything that
can be checked without a model, so bad input fails before any compute is spent.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .bases import SCHEDULES
from .errors import InputError
from .methods import METHODS, Method


@dataclass
class AdapterConfig:
    """Configuration of one adapter.

    Shared (peft ``LoraConfig`` names in brackets):
        method: one of :data:`shared.methods.METHODS` (the registry of methods and their traits).
        r: LoRA rank [``r``]; EVA's rank budget per layer before redistribution.
        alpha: LoRA scale numerator, scale = alpha / r [``lora_alpha``].
        dropout: dropout on the adapter input, shared by the dash term [``lora_dropout``].
        target_modules: module names or suffixes, or a regex string [``target_modules``].
        modules_to_save: extra modules trained in full (classifier heads) [``modules_to_save``].
        seed: seeds every random choice of the init (LoRA A, randomized SVDs).

    LoRA-Dash (Si et al. 2024, Sec. 4; ``docs/methods.md#lora-dash``):
        dash_warmup_steps: t, optimizer steps of plain LoRA before the switch.
        dash_directions: s, number of task-specific directions amplified per layer.
        dash_eps: eps in the change rate delta = |Δσ| / (σ + eps).
        dash_lr_ratio: λ's learning rate is this ratio times the base learning rate (like LoRA+ for B);
            1 is the method as published (:meth:`shared.Adapter.param_groups` builds the optimizer groups).
        dash_svd: when the SVDs of the frozen weights that the switch projects onto are computed
            (:mod:`shared.bases`): ``"background"`` (a thread started at the first optimizer step, idle priority on
            CPU, a side stream on CUDA), ``"upfront"`` (at the first optimizer step or
            :meth:`shared.Adapter.prepare_switch`, in the calling thread) or ``"switch"`` (at the switch). The
            selection is bit for bit the same.
        dash_svd_cache_dir: a directory where those SVDs are kept between runs, keyed by a hash of the weights and
            of what the SVD's bits depend on (None: no cache; the SVDs go to a temporary directory).

    LoRA-Init (reconstruction, ``docs/methods.md#lora-init``):
        lora_init_estimator: ``"warmup"`` (δ from a short, discarded LoRA run) or ``"gradient"``
            (δ from the accumulated gradient, ΔW ≈ -∇W L).
        lora_init_steps: optimizer steps (warmup) or batches (gradient) of the estimate.
        lora_init_lr: learning rate of the discarded warm-up run.

    EVA (Paischer et al. 2024, ``docs/methods.md#eva``): eva_tau (cosine convergence threshold), eva_rho
        (max rank per layer is round(rho * r)), eva_whiten, eva_max_batches (cap; peft has none),
        eva_use_label_mask.

    LoRA-DA (arXiv 2510.24561, ``docs/methods.md#lora-da``): lora_da_alpha (bias weight), lora_da_beta
        (variance weight), lora_da_gamma (stable gamma), lora_da_num_samples (N samples for G and the
        Fisher factors), lora_da_population (N in the variance weight: the training-set size, as the
        reference uses; None falls back to lora_da_num_samples with a warning; the trainers pass their
        training-set length), lora_da_damping, lora_da_max_bytes (cap on the fp32 statistics held at once;
        None: all layers in one pass; set, the layers are chunked and the data is read once per chunk).

    Gradient statistics (LoRA-DA, LoRA-Init's gradient estimator): grad_label_mask. Off (default), they sum
        over every attended position, which gives the exact ∂L/∂W whatever labels the batch carries; on, only
        over positions whose next token is a label (labels[t+1] != -100), an approximation.

    LoRA-GA (peft baseline): lora_ga_batches, number of batches of the gradient estimate.
    """

    method: str = "dash"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    seed: int = 0

    dash_warmup_steps: int = 100
    dash_directions: int = 8
    dash_eps: float = 1e-8
    dash_lr_ratio: float = 1.0
    dash_svd: str = "background"
    dash_svd_cache_dir: str | None = None

    lora_init_estimator: str = "warmup"
    lora_init_steps: int = 20
    lora_init_lr: float = 1e-3

    eva_tau: float = 0.99
    eva_rho: float = 2.0
    eva_whiten: bool = False
    eva_max_batches: int = 64
    eva_use_label_mask: bool = True

    lora_da_alpha: float = 1.0
    lora_da_beta: float = 0.03
    lora_da_gamma: float = 1024.0
    lora_da_num_samples: int = 256
    lora_da_population: int | None = None
    lora_da_damping: float = 1e-6
    lora_da_max_bytes: int | None = None

    lora_ga_batches: int = 8

    grad_label_mask: bool = False

    #: keep adapter weights in fp32 when the base is fp16/bf16 (peft's ``autocast_adapter_dtype``)
    autocast_adapter_dtype: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.dash_svd_cache_dir, os.PathLike):
            self.dash_svd_cache_dir = os.fspath(self.dash_svd_cache_dir)
        self.validate()

    @property
    def scale(self) -> float:
        """LoRA scale gamma = alpha / r."""
        return self.alpha / self.r

    @property
    def spec(self) -> Method:
        """The registry entry of :attr:`method` (its init and traits)."""
        return METHODS[self.method]

    @property
    def uses_dash(self) -> bool:
        return self.spec.dash_phase

    @property
    def needs_data(self) -> bool:
        return self.spec.needs_data

    @property
    def residualises_base(self) -> bool:
        return self.spec.residualises_base

    def validate(self) -> None:
        """Raise :class:`~shared.errors.InputError` (a ``ValueError``) naming the field for every value that cannot
        work."""
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        _positive_int("r", self.r)
        if self.alpha <= 0:
            raise InputError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dash_warmup_steps < 0:
            raise InputError(f"dash_warmup_steps (t) must be >= 0, got {self.dash_warmup_steps}")
        if self.uses_dash and self.dash_warmup_steps == 0:
            raise InputError(
                "dash_warmup_steps (t) must be >= 1 for dash/tsd: the change rate is measured on the LoRA "
                "update after t optimizer steps, and at step 0 that update is zero"
            )
        _positive_int("dash_directions", self.dash_directions)
        if not self.dash_lr_ratio > 0:
            raise InputError(f"dash_lr_ratio must be > 0, got {self.dash_lr_ratio}")
        if self.dash_svd not in SCHEDULES:
            raise InputError(f"dash_svd must be one of {', '.join(SCHEDULES)}, got {self.dash_svd!r}")
        if self.dash_svd_cache_dir is not None and not isinstance(self.dash_svd_cache_dir, str):
            raise InputError(f"dash_svd_cache_dir must be a path string or None, got {self.dash_svd_cache_dir!r}")
        if self.lora_init_estimator not in ("warmup", "gradient"):
            raise InputError(f"lora_init_estimator must be 'warmup' or 'gradient', got {self.lora_init_estimator!r}")
        _positive_int("lora_init_steps", self.lora_init_steps)
        if not 0.0 <= self.eva_tau <= 1.0:
            raise InputError(f"eva_tau must be in [0, 1], got {self.eva_tau}")
        if self.eva_rho < 1.0:
            raise InputError(f"eva_rho must be >= 1, got {self.eva_rho}")
        _positive_int("eva_max_batches", self.eva_max_batches)
        _positive_int("lora_da_num_samples", self.lora_da_num_samples)
        _positive_int("lora_ga_batches", self.lora_ga_batches)
        if self.lora_da_max_bytes is not None:
            _positive_int("lora_da_max_bytes", self.lora_da_max_bytes)
        if self.lora_da_population is not None:
            _positive_int("lora_da_population", self.lora_da_population)
        if self.lora_da_gamma <= 0:
            raise InputError(f"lora_da_gamma must be > 0, got {self.lora_da_gamma}")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise InputError("target_modules is an empty list; name at least one module")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown AdapterConfig field(s): {', '.join(unknown)}")
        return cls(**d)


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
