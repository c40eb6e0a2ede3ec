"""LoRA-Init: LoRA initialised on the task-specific directions (Si et al., arXiv 2409.01035 v5).

The paper body is not available; this is our reconstruction (``docs/methods.md#lora-init``), with the open
choices made configurable:

1. Estimate the change rates δ (:mod:`shared.tsd`) of every target weight, either from a short LoRA
   warm-up on the user's data that is then discarded (``lora_init_estimator="warmup"``: ΔW = (α/r) B A
   after ``lora_init_steps`` AdamW steps at ``lora_init_lr``), or from the accumulated gradient
   (``"gradient"``: ΔW ≈ -∇_W L over ``lora_init_steps`` batches).
2. Take the top-r directions I among the numerically non-null ones (σ_i above the floor of
   :func:`shared.tsd.non_null`) and initialise PiSSA-style on them:
   B = U_I Σ_I^{1/2} / √γ, A = Σ_I^{1/2} V_Iᵀ / √γ (γ = α/r), so γ B A = U_I Σ_I V_Iᵀ. A weight with fewer
   than r non-null directions keeps peft's default init (random A, B = 0) in the remaining slots.
3. Residualise W ← W - γ (B A), so the initial model equals the base model (up to W's rounding).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import tsd
from ..distributed import all_reduce_sum, world_size
from ..injection import add_offset, inject, residualise, set_lora
from ..layers import dense_weight, in_out_features, iter_lora_layers, nominal_scale
from ..statistics import ForwardFn, gradient_mask, require_loss, weight_gradients

if TYPE_CHECKING:
    from ..config import AdapterConfig


def gradient_updates(model: nn.Module, targets: dict[str, nn.Module], config: AdapterConfig, batches: list[Any],
                     forward_fn: ForwardFn, progress: bool = True) -> dict[str, torch.Tensor]:
    """ΔW ≈ -mean gradient per target layer (out × in), from the statistics engine (pooled across processes)."""
    grads = weight_gradients(model, targets, batches, forward_fn, max_batches=config.lora_init_steps,
                             mask_fn=gradient_mask(config), desc="LoRA-Init: accumulating gradients", progress=progress)
    return {name: -g for name, g in grads.items()}


def warmup_lora(model: nn.Module, params: list[torch.nn.Parameter], config: AdapterConfig, batches: list[Any],
                forward_fn: ForwardFn, progress: bool = True) -> None:
    """Train the freshly injected LoRA for ``lora_init_steps`` AdamW steps (the run is discarded afterwards).

    Under DDP each step applies the mean gradient of every process's batch, as DDP would, so every rank warms up
    the same LoRA on N× the batches."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=config.lora_init_lr, weight_decay=0.0)
    world = world_size()
    was_training = model.training
    model.train()
    try:
        for batch in tqdm(itertools.islice(itertools.cycle(batches), config.lora_init_steps),
                          total=config.lora_init_steps, desc="LoRA-Init: warm-up", disable=not progress, leave=False):
            require_loss(forward_fn(model, batch)).backward()
            if world > 1:
                grads = all_reduce_sum([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
                for p, g in zip(params, grads, strict=True):
                    p.grad = g / world
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
        for p in model.parameters():  # e.g. a classifier head in modules_to_save got gradients too
            p.grad = None


def tsd_init_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, indices: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) on directions ``indices`` of W = U diag(S) Vh: A = Σ_I^{1/2} V_Iᵀ / √γ, B = U_I Σ_I^{1/2} / √γ,
    so γ B A = U_I Σ_I V_Iᵀ (the base is then residualised by ``shared.adapter.residualise``)."""
    root = (S[indices] / scale).sqrt()
    return root.unsqueeze(1) * Vh[indices], U[:, indices] * root.unsqueeze(0)


@torch.no_grad()
def init_lora_init(model: nn.Module, config: AdapterConfig, targets: dict[str, nn.Module], batches: list[Any],
                   forward_fn: ForwardFn, adapter_name: str, progress: bool) -> None:
    """LoRA-Init (and LoRA-TSD's init): estimate δ, init on the top-r non-null directions, residualise W.

    A weight with fewer than r non-null directions (:func:`shared.tsd.non_null`) keeps peft's default init
    (random A, B = 0) in the remaining rank slots: they start at zero update and train as plain LoRA.
    """
    names = sorted(targets)
    dense = None
    if config.lora_init_estimator == "gradient":
        with torch.enable_grad():
            dense = gradient_updates(model, targets, config, batches, forward_fn, progress)
    inject(model, config, names, adapter_name)
    layers = dict(iter_lora_layers(model, adapter_name))
    # peft's default init (random A, B = 0), kept for the slots no non-null direction fills
    fresh = {n: (layer.lora_A[adapter_name].weight.clone(), layer.lora_B[adapter_name].weight.clone())
             for n, layer in layers.items()}
    if dense is None:
        with torch.enable_grad():
            params = [p for layer in layers.values() for p in
                      (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight)]
            warmup_lora(model, params, config, batches, forward_fn, progress)
        warm = {n: (nominal_scale(layer, adapter_name) * layer.lora_B[adapter_name].weight.float(),
                    layer.lora_A[adapter_name].weight.float()) for n, layer in layers.items()}

    def weight_of(name: str) -> torch.Tensor:
        return dense_weight(layers[name].get_base_layer())

    def shape_of(name: str) -> tuple[int, int]:
        return in_out_features(layers[name].get_base_layer())[::-1]

    for name, U, S, Vh in tsd.iter_svd(names, weight_of, shape_of):
        layer = layers[name]
        ds = ((U.T @ dense[name]) * Vh).sum(1) if dense is not None else tsd.delta_sigma(U, Vh, *warm[name])
        valid = tsd.non_null(S, shape_of(name))
        idx = tsd.select_directions(tsd.change_rate(S, ds, config.dash_eps), config.r, valid)
        A, B = fresh[name]
        A[: idx.numel()], B[:, : idx.numel()] = tsd_init_factors(U, S, Vh, idx, nominal_scale(layer, adapter_name))
        set_lora(layer, adapter_name, A, B)
        residualise(layer, add_offset(layer, adapter_name))
