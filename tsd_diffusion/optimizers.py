"""The trainer's optimizers (``--optimizer``, ``--use_8bit_adam``), built over parameter groups.

- ``adamw``: ``torch.optim.AdamW``, or bitsandbytes' ``AdamW8bit`` with ``--use_8bit_adam`` (8-bit moments for
  tensors of 4096+ elements, 32-bit below);
- ``prodigy``: ``prodigyopt.Prodigy`` (Mishchenko & Defazio 2023; the ``prodigy`` extra), with diffusers'
  ``--prodigy_beta3``, ``--prodigy_decouple``, ``--prodigy_use_bias_correction``, ``--prodigy_safeguard_warmup``;
  its learning rate multiplies the step size it estimates (1.0 is the usual ``--learning_rate``). Prodigy accepts
  one learning rate for all groups, so a group asking for ``c`` times the first group's (λ under
  ``--dash_lr_ratio``, the text encoders' ``--text_encoder_lr``) runs at the common rate and has its update scaled
  by ``c`` after every step (:func:`scale_group_updates`): θ ← θ₀ + c (θ - θ₀), which is the update a group rate of
  ``c`` times the common one gives for any update linear in the rate (Prodigy's ``d·lr`` step and its decoupled
  weight decay are);
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

        common = groups[0]["lr"]
        groups = [{**g, "lr": common, "update_scale": g["lr"] / common} for g in groups]
        optimizer = Prodigy(groups, lr=common, betas=betas, beta3=settings.prodigy_beta3,
                            weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon,
                            decouple=settings.prodigy_decouple,
                            use_bias_correction=settings.prodigy_use_bias_correction,
                            safeguard_warmup=settings.prodigy_safeguard_warmup)
        scale_group_updates(optimizer)
        return optimizer
    if settings.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, weight_decay=settings.adam_weight_decay, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    opt_cls = torch.optim.AdamW
    if settings.use_8bit_adam:
        import bitsandbytes as bnb

        opt_cls = bnb.optim.AdamW8bit
    return opt_cls(groups, lr=lr, betas=betas, weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon)


def scale_group_updates(optimizer: torch.optim.Optimizer) -> None:
    """Scale the update of every parameter group with an ``update_scale`` c ≠ 1 by c after each step:
    θ ← θ₀ + c (θ - θ₀), θ₀ the value before the step (kept by a step pre-hook; only those groups' tensors)."""
    before: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def keep(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        before[:] = [(p, p.detach().clone(), g["update_scale"]) for g in opt.param_groups
                     if g.get("update_scale", 1.0) != 1.0 for p in g["params"]]

    @torch.no_grad()
    def scale(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, p0, c in before:
            p.copy_(p0 + c * (p - p0))
        before.clear()

    optimizer.register_step_pre_hook(keep)
    optimizer.register_step_post_hook(scale)
