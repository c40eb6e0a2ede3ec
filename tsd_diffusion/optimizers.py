"""The trainer's optimizers (``--optimizer``, ``--use_8bit_adam``), built over parameter groups.

- ``adamw``: ``torch.optim.AdamW``, or bitsandbytes' ``AdamW8bit`` with ``--use_8bit_adam`` (8-bit moments for
  tensors of 4096+ elements, 32-bit below);
- ``prodigy``: ``prodigyopt.Prodigy`` (Mishchenko & Defazio 2023; the ``prodigy`` extra), with diffusers'
  ``--prodigy_beta3``, ``--prodigy_decouple``, ``--prodigy_use_bias_correction``, ``--prodigy_safeguard_warmup``;
  its group learning rates are multipliers of the step size it estimates (1.0 is the usual ``--learning_rate``);
- ``adafactor``: ``transformers.optimization.Adafactor`` (Shazeer & Stern 2018) at the given learning rate
  (``relative_step=False, scale_parameter=False, warmup_init=False``, as kohya runs it with a fixed lr).

All three keep their state per parameter, so the dash switch's reset of λ's state (``shared.Adapter.step``)
works for each: the state is dropped and re-created at λ's next update.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from shared.errors import InputError

OPTIMIZERS = ("adamw", "prodigy", "adafactor")


@dataclass(frozen=True)
class OptimizerSettings:
    """The flags an optimizer reads (diffusers' names)."""

    name: str = "adamw"
    use_8bit_adam: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    prodigy_beta3: float | None = None
    prodigy_decouple: bool = True
    prodigy_use_bias_correction: bool = True
    prodigy_safeguard_warmup: bool = True

    def check(self) -> None:
        """Refuse settings that cannot run, naming the flag (before any compute)."""
        if self.name not in OPTIMIZERS:
            raise InputError(f"--optimizer {self.name!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.use_8bit_adam and self.name != "adamw":
            raise InputError(f"--use_8bit_adam is an AdamW option; it contradicts --optimizer {self.name}")
        needs = {"prodigy": ("prodigyopt", "pip install prodigyopt (or the tsd-lora[prodigy] extra)"),
                 "adafactor": ("transformers", "pip install transformers")}
        if self.use_8bit_adam:
            needs["adamw"] = ("bitsandbytes", "pip install bitsandbytes")
        if self.name in needs and importlib.util.find_spec(needs[self.name][0]) is None:
            flag = "--use_8bit_adam" if self.name == "adamw" else f"--optimizer {self.name}"
            raise InputError(f"{flag} needs {needs[self.name][0]}: {needs[self.name][1]}")
        if self.prodigy_beta3 is not None and not 0 < self.prodigy_beta3 < 1:
            raise InputError(f"--prodigy_beta3 must be in (0, 1), got {self.prodigy_beta3}")


def make_optimizer(settings: OptimizerSettings, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """The optimizer of ``settings`` over ``groups`` (each with its own ``lr``); ``lr`` is also the optimizer's
    default, which diffusers' polynomial schedule reads as its starting lr."""
    betas = (settings.adam_beta1, settings.adam_beta2)
    if settings.name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, betas=betas, beta3=settings.prodigy_beta3,
                       weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon,
                       decouple=settings.prodigy_decouple, use_bias_correction=settings.prodigy_use_bias_correction,
                       safeguard_warmup=settings.prodigy_safeguard_warmup)
    if settings.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, weight_decay=settings.adam_weight_decay, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    opt_cls = torch.optim.AdamW
    if settings.use_8bit_adam:
        import bitsandbytes as bnb

        opt_cls = bnb.optim.AdamW8bit
    return opt_cls(groups, lr=lr, betas=betas, weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon)
