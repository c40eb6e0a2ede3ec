"""LoRA-GA (Wang et al., arXiv 2407.05000) with peft's init: LoRA initialised from the SVD of the accumulated
gradient, with W residualised by the initial update. A baseline of the core; ``docs/methods.md#pissa-and-lora-ga``.

The gradient is the statistics engine's (:func:`shared.statistics.weight_gradients`: ∂L/∂W = Σ_t g_t x_tᵀ from layer
inputs and output gradients, the mean over ``lora_ga_batches`` batches, as peft's ``preprocess_loraga`` averages
``weight.grad``), so it needs no gradient buffer on W, works on a quantised W (which has none) and is pooled across
processes like the other gradient statistics. peft's ``lora_ga_init`` turns it into the factors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..injection import add_offset, dense_stand_in, inject, residualise
from ..layers import dense_weight, is_fan_in_fan_out, iter_lora_layers, set_dense_weight
from ..statistics import ForwardFn, gradient_mask, weight_gradients

if TYPE_CHECKING:
    from ..config import AdapterConfig


@torch.no_grad()
def init_lora_ga(model: nn.Module, config: AdapterConfig, targets: dict[str, nn.Module], batches: list[Any],
                 forward_fn: ForwardFn, adapter_name: str, progress: bool) -> None:
    """LoRA-GA: the mean gradient over ``lora_ga_batches`` batches, peft's ``lora_ga_init`` per layer, then the base
    residualised by :func:`shared.injection.residualise` (LoftQ-style on a quantised base)."""
    from peft import LoraGAConfig

    with torch.enable_grad():
        grads = weight_gradients(model, targets, batches, forward_fn, max_batches=config.lora_ga_batches,
                                 mask_fn=gradient_mask(config), desc="LoRA-GA: accumulating gradients",
                                 progress=progress)
    inject(model, config, sorted(targets), adapter_name)
    for name, layer in iter_lora_layers(model, adapter_name):
        with dense_stand_in(layer) as base:
            W = dense_weight(base).detach().clone()
            grad = grads.pop(name)
            base._peft_loraga_grad = grad.T if is_fan_in_fan_out(base) else grad  # in W's own layout
            layer.lora_ga_init(adapter_name, LoraGAConfig())
            set_dense_weight(base, W)  # peft residualised W; the core's one expression does it below
        residualise(layer, add_offset(layer, adapter_name))
