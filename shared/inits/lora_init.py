"""LoRA-Init: LoRA initialised on the task-specific directions (Si et al., arXiv 2409.01035 v5).

The paper body is not available; this is the reconstruction of ``lora_dash.md`` §4, with the open
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
from typing import Any

import torch
from torch import nn

from ..config import AdapterConfig
from ..statistics import ForwardFn, WeightGradient, collect, gradient_mask, require_loss


def gradient_updates(model: nn.Module, targets: dict[str, nn.Module], config: AdapterConfig, batches: list[Any],
                     forward_fn: ForwardFn, progress: bool = True) -> dict[str, torch.Tensor]:
    """ΔW ≈ -mean gradient per target layer (out × in), from the statistics engine."""
    accs = {name: WeightGradient() for name in targets}
    collect(model, targets, accs, itertools.cycle(batches), forward_fn, mask_fn=gradient_mask(config),
            max_batches=config.lora_init_steps, desc="LoRA-Init: accumulating gradients", progress=progress)
    return {name: -acc.value for name, acc in accs.items()}


def warmup_lora(model: nn.Module, params: list[torch.nn.Parameter], config: AdapterConfig, batches: list[Any],
                forward_fn: ForwardFn, progress: bool = True) -> None:
    """Train the freshly injected LoRA for ``lora_init_steps`` AdamW steps (the run is discarded afterwards)."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=config.lora_init_lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    try:
        for batch in tqdm(itertools.islice(itertools.cycle(batches), config.lora_init_steps),
                          total=config.lora_init_steps, desc="LoRA-Init: warm-up", disable=not progress, leave=False):
            require_loss(forward_fn(model, batch)).backward()
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
