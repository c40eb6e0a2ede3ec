"""PiSSA (Meng et al., arXiv 2404.02948) through peft: LoRA initialised on the top-r singular directions of W,
B = U_r Σ_r^{1/2}, A = Σ_r^{1/2} V_rᵀ (over √γ), and W residualised so the initial model is the base. A baseline of
the core; ``docs/methods.md#pissa-and-lora-ga``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..injection import add_offset, dense_stand_in, inject, residualise
from ..layers import dense_weight, iter_lora_layers, set_dense_weight
from ..statistics import ForwardFn

if TYPE_CHECKING:
    from ..config import AdapterConfig


@torch.no_grad()
def init_pissa(model: nn.Module, config: AdapterConfig, targets: dict[str, nn.Module], batches: list[Any],
               forward_fn: ForwardFn, adapter_name: str, progress: bool) -> None:
    """PiSSA with peft's factors (``LoraLayer.pissa_init``), the base residualised by :func:`residualise`.

    peft rounds its residual as W - (γB) A; the core's one expression is W - γ (B A), which the reload repeats
    bit for bit. So each layer's W is kept while peft computes the factors and residualised again from it. peft
    refuses a quantised W; there it runs on a dense stand-in holding deq(Q(W)), and the residual is quantised again
    (LoftQ-style, :func:`shared.injection.residualise`).
    """
    inject(model, config, sorted(targets), adapter_name)
    for _, layer in iter_lora_layers(model, adapter_name):
        with dense_stand_in(layer) as base:
            W = dense_weight(base).detach().clone()
            layer.pissa_init(adapter_name, "pissa")
            set_dense_weight(base, W)
        residualise(layer, add_offset(layer, adapter_name))
