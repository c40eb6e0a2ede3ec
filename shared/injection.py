"""Putting an adapter's pieces on a model: peft's LoRA layers under an adapter name, their factors, and the two
things the core adds to a peft layer, keyed by adapter name like peft's own ``lora_A``/``lora_B``:

- ``tsd_dash`` (:class:`shared.dash.DashTerm`): the LoRA-Dash term of methods with a dash phase;
- ``tsd_init`` (:class:`InitOffset`): the frozen init factors of methods that residualise W, W_res = W - γ₀ B₀A₀.

:func:`shared.attach` (through the method inits of :mod:`shared.inits`) and :func:`shared.load` use these same
functions, so a reloaded adapter is built exactly as the attached one was.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .dash import DashTerm, DashVariant
from .errors import InputError
from .layers import (
    dense_weight,
    full_tensor,
    in_out_features,
    is_fan_in_fan_out,
    iter_lora_layers,
    nominal_scale,
    set_dense_weight,
)
from .quantization import is_quantized

if TYPE_CHECKING:
    from .config import AdapterConfig


class InitOffset(nn.Module):
    """Frozen init factors of a method that residualised the base, with the scale γ₀ they were applied at.

    W_res = W - γ₀ (B₀ A₀): :meth:`product` is the one expression of the residual, used by the init and by
    the native reload alike, so a reload rebuilds W_res bit for bit. γ₀ is recorded, not read from peft's
    ``scaling``, which runtime scales (``scale_layer``, ``set_adapters`` weights) change.
    """

    def __init__(self, A0: torch.Tensor, B0: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.A0 = nn.Parameter(A0.detach().float().clone().contiguous(), requires_grad=False)
        self.B0 = nn.Parameter(B0.detach().float().clone().contiguous(), requires_grad=False)
        self.scale = float(scale)
        #: ‖stored W_res - W_res‖_F / ‖W_res‖_F as :func:`residualise` left it: 0 on an fp32 base, the rounding to a
        #: bf16/fp16 base, the requantisation error on a quantised one (``docs/text.md#qlora``); None before it ran
        self.residual_error: float | None = None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B₀, A₀) in fp32, gathered under FSDP2."""
        return full_tensor(self.B0).float(), full_tensor(self.A0).float()

    def product(self) -> torch.Tensor:
        """γ₀ (B₀ A₀), fp32, out × in (the rounding order of peft's LoRA-GA residual)."""
        B0, A0 = self.factors()
        return self.scale * (B0 @ A0)


def residualise(layer: nn.Module, offset: InitOffset) -> None:
    """W ← W - γ₀ (B₀ A₀): computed in fp32 and rounded once to W's dtype, at the init and at a reload.

    On a quantised base this is LoftQ-style: W is dequantised, the residual formed in fp32 and quantised again with
    the layer's settings (:func:`shared.quantization.requantize`); deterministic, so a reload stores the same bytes.
    ``offset.residual_error`` records how far the stored residual is from the exact one.
    """
    base = layer.get_base_layer()
    with torch.no_grad():
        residual = dense_weight(base).float() - offset.product().to(base.weight.device)
        set_dense_weight(base, residual)
        stored = dense_weight(base).float()
        offset.residual_error = float((stored - residual).norm() / residual.norm().clamp_min(torch.finfo().tiny))


@contextlib.contextmanager
def dense_stand_in(layer: nn.Module) -> Iterator[nn.Module]:
    """The base layer of a peft layer as a dense Linear while the block runs, for peft's inits that read and write
    ``get_base_layer().weight`` in floating point (PiSSA, LoRA-GA), which refuse a quantised one.

    A dense base is yielded as it is. A quantised base (:mod:`shared.quantization`) is swapped for an ``nn.Linear``
    holding deq(Q(W)) in fp32 (this layer alone is dequantised) and put back, unchanged, afterwards: whatever the
    block wrote into the stand-in is dropped, so the caller residualises the quantised base itself.
    """
    base = layer.get_base_layer()
    if not is_quantized(base):
        yield base
        return
    d_in, d_out = in_out_features(base)
    stand_in = nn.utils.skip_init(nn.Linear, d_in, d_out, bias=False, device=base.weight.device)  # draws no RNG
    stand_in.weight = nn.Parameter(dense_weight(base).float(), requires_grad=False)
    owner = layer
    while owner.base_layer is not base:  # peft nests a layer holding earlier adapters
        owner = owner.base_layer
    owner.base_layer = stand_in
    try:
        yield stand_in
    finally:
        owner.base_layer = base


def check_new_adapter(model: nn.Module, adapter_name: str, config: AdapterConfig, names: list[str]) -> None:
    """Refuse a taken adapter name, and a second adapter on a layer whose base a residualising method changed (or
    would change): every adapter of that layer, active or not, would compute on the residual W - γ₀B₀A₀."""
    from peft.tuners.lora import LoraLayer

    if any(True for _ in iter_lora_layers(model, adapter_name)):
        raise InputError(f"the model already holds an adapter named {adapter_name!r}; pass another adapter_name")
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoraLayer) or not layer.lora_A:
            continue
        if config.residualises_base or getattr(layer, "tsd_init", None):
            raise InputError(f"layer {name} already holds adapter(s) {sorted(layer.lora_A)}, and "
                             f"{'method ' + repr(config.method) if config.residualises_base else 'one of them'} "
                             "changes its base weight (W - γ₀B₀A₀), which every adapter of the layer would then see; "
                             "residualising methods (lora_init, tsd, pissa, lora_ga) need layers of their own")


def make_lora_config(config: AdapterConfig, names: list[str], ranks: dict[str, int] | None = None, init: Any = True,
                fan_in_fan_out: bool = False) -> Any:
    """peft's ``LoraConfig`` for ``names``: r, α, dropout and ``modules_to_save`` of ``config``; ``ranks`` per layer
    (EVA) keep the scale α/r."""
    from peft import LoraConfig

    ranks = ranks or {}
    rank_pattern = {re.escape(n): r for n, r in ranks.items() if r != config.r}
    return LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(names),
        rank_pattern=rank_pattern,
        # EVA keeps the scale α/r when it changes a layer's rank (peft's adjust_scaling_factors)
        alpha_pattern={k: config.alpha * r / config.r for k, r in rank_pattern.items()},
        modules_to_save=config.modules_to_save, init_lora_weights=init, fan_in_fan_out=fan_in_fan_out,
    )


def inject(model: nn.Module, config: AdapterConfig, names: list[str], adapter_name: str,
           ranks: dict[str, int] | None = None, init: Any = True, lora_config: Any = None) -> None:
    """peft's ``inject_adapter_in_model`` under ``adapter_name``, made the active adapter (peft keeps an earlier one
    active), then cast to fp32 on a half-precision base (``autocast_adapter_dtype``) before any init writes its fp32
    factors into it."""
    from peft import inject_adapter_in_model
    from peft.functional import set_adapter

    fifo = any(is_fan_in_fan_out(unwrapped(model.get_submodule(n))) for n in names)
    inject_adapter_in_model(lora_config or make_lora_config(config, names, ranks, init, fifo), model,
                            adapter_name=adapter_name)
    set_adapter(model, adapter_name)
    _cast_adapter(model, adapter_name, config)


def unwrapped(module: nn.Module) -> nn.Module:
    """The base layer of a peft layer (a model holding an earlier adapter), else the module itself."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


@torch.no_grad()
def set_lora(layer: nn.Module, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """Write A (r × in) and B (out × r) into a peft layer's factors of ``adapter_name``."""
    layer.lora_A[adapter_name].weight.copy_(A)
    layer.lora_B[adapter_name].weight.copy_(B)


def add_offset(layer: nn.Module, adapter_name: str) -> InitOffset:
    """Record the layer's current LoRA factors and scale as the init offset of a base-mutating init."""
    if not hasattr(layer, "tsd_init"):
        layer.tsd_init = nn.ModuleDict()
    offset = InitOffset(layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight,
                        nominal_scale(layer, adapter_name))
    layer.tsd_init[adapter_name] = offset
    return offset


def _cast_adapter(model: nn.Module, adapter_name: str, config: AdapterConfig) -> None:
    if not config.autocast_adapter_dtype:
        return
    for _, layer in iter_lora_layers(model, adapter_name):
        for mod in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
            if mod.weight.dtype in (torch.float16, torch.bfloat16):
                mod.float()


def add_dash(model: nn.Module, adapter_name: str, config: AdapterConfig) -> None:
    """Give every layer of ``adapter_name`` its dash term (s frozen directions and trainable λ = 0, inactive until
    the switch) and peft's forward the :class:`~shared.dash.DashVariant` that adds it."""
    for _, layer in iter_lora_layers(model, adapter_name):
        d_in, d_out = in_out_features(layer.get_base_layer())
        ref = layer.lora_A[adapter_name].weight
        if not hasattr(layer, "tsd_dash"):
            layer.tsd_dash = nn.ModuleDict()
        layer.tsd_dash[adapter_name] = DashTerm(d_out, d_in, config.dash_directions, ref.dtype, ref.device)
        layer.lora_variant[adapter_name] = DashVariant()
