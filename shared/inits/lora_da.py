"""LoRA-DA: data-aware initialisation (arXiv 2510.24561; closed form in ``docs/methods.md#lora-da``).

Per layer, with G = E[∂L/∂W] (out × in), the K-FAC factors Z = E[x xᵀ] (in × in, uncentred) and
Y = diag(E[g ⊙ g]) (out), all damped by λ:

    D  = -Z⁻¹ Gᵀ Y⁻¹                      Fisher-gradient direction (paper layout, in × out)
    D̂  = D / ‖D‖₂
    Ω  = -α D̂ D̂ᵀ + β c Z⁻¹,  c = tr(Y⁻¹) / (N σ²)     bias term + variance term (§2.5)
    A₀ = eigenvectors of Ω for its r smallest eigenvalues (Ky Fan)
    B₀ = A₀ᵀ D̂
    lora_A = A₀ᵀ / √γ,  lora_B = B₀ᵀ / √γ

N is the population size of the variance term: the training-set size in the reference
(``lora_da_population``; unset, it falls back to the number of statistics samples, with a warning, which makes
the variance weight len(train)/N_samples times too large). The base weight is not changed (as in the reference
code), so the model moves by (α_lora/r)·B A at step 0.

Memory: the statistics are per layer G (out × in) and y (out) in fp32, and Z (in × in) once per group of layers
that read the same input (q/k/v, gate/up share one): :func:`statistics_bytes`. By default every target's are held
at once (for LLaMA-3-8B with all seven projections adapted that is about 61 GB, 26 GB of it the 32 down_proj Z's
of 14336²). ``lora_da_max_bytes`` caps it: the layers are split into chunks (whole input groups) whose statistics
fit, and the statistics pass runs once per chunk over the same batches, so ``forward_fn`` must be deterministic
(seed any noise per batch, as the SDXL trainer does).
"""

from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..injection import inject, set_lora
from ..layers import in_out_features, iter_lora_layers
from ..statistics import FisherGradient, ForwardFn, batch_size_of, collect, gradient_mask, shared_input_groups

if TYPE_CHECKING:
    from ..config import AdapterConfig


def damped_cholesky(Z: torch.Tensor, damping: float, where: str = "") -> torch.Tensor:
    """Cholesky factor of sym(Z) + λI with the reference's λ; when that is not positive definite in this precision
    (Z from fewer samples than inputs, e.g. a pooler that sees one row per sequence), λ grows from 1e-7 · mean(diag Z)
    by factors of 10 until it is, with a warning naming the layer."""
    Z = (Z + Z.T) / 2
    eye = torch.eye(Z.shape[0], dtype=Z.dtype, device=Z.device)
    used = damping
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(Z + used * eye)
        if int(info) == 0:
            if used != damping:
                warnings.warn(f"LoRA-DA{where}: Z + {damping:g} I is not positive definite in {Z.dtype} (fewer samples "
                              f"than inputs?); damped with {used:.3g} instead", stacklevel=2)
            return L
        used = max(used * 10, 1e-7 * float(Z.diagonal().mean().clamp_min(torch.finfo(Z.dtype).tiny)))
    raise ValueError(f"LoRA-DA{where}: the input second moment Z is not positive definite even damped by {used:.3g}")


def lora_da_factors(G: torch.Tensor, Z: torch.Tensor, y: torch.Tensor, *, r: int, alpha: float, beta: float,
                    gamma: float, population: int, damping: float,
                    where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-DA's closed form; returns peft's (lora_A: r × in, lora_B: out × r). All inputs fp32."""
    L = damped_cholesky(Z, damping, where)
    y_inv = 1.0 / (y + damping)
    D = -torch.cholesky_solve(G.T.contiguous(), L) * y_inv.unsqueeze(0)
    sigma = torch.linalg.matrix_norm(D, ord=2)
    if not torch.isfinite(sigma) or sigma <= 0:
        raise ValueError("LoRA-DA: the Fisher-gradient direction is zero (no gradient reached this layer)")
    D_hat = D / sigma
    c = y_inv.sum() / (population * sigma**2)
    omega = -alpha * (D_hat @ D_hat.T) + beta * c * torch.cholesky_inverse(L)
    _, vecs = torch.linalg.eigh((omega + omega.T) / 2)
    A0 = vecs[:, :r]
    pivot = A0.abs().argmax(dim=0, keepdim=True)
    A0 = A0 * torch.sign(torch.gather(A0, 0, pivot))
    B0 = A0.T @ D_hat
    scale = gamma**-0.5
    return (A0.T * scale).contiguous(), (B0.T * scale).contiguous()


def statistics_bytes(group: list[str], targets: dict[str, nn.Module]) -> int:
    """fp32 bytes of the statistics of one input group: Σ_layers (out·in + out) + in² (one shared Z)."""
    shapes = [in_out_features(targets[n]) for n in group]
    d_in = shapes[0][0]
    return 4 * (sum(d_out * d_in + d_out for _, d_out in shapes) + d_in * d_in)


def chunk_groups(groups: list[list[str]], targets: dict[str, nn.Module],
                 max_bytes: int | None) -> list[list[list[str]]]:
    """Consecutive input groups packed into chunks of at most ``max_bytes`` of statistics (a larger group alone)."""
    if max_bytes is None:
        return [groups]
    chunks: list[list[list[str]]] = []
    used = 0
    for group in groups:
        size = statistics_bytes(group, targets)
        if not chunks or used + size > max_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += size
    return chunks


def lora_da_init(model: nn.Module, targets: dict[str, nn.Module], config: AdapterConfig, batches: list[Any],
                 forward_fn: ForwardFn, progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Collect G, Z, y over ``lora_da_num_samples`` samples and solve every layer, chunk by chunk."""
    population = config.lora_da_population
    if population is None:
        population = config.lora_da_num_samples
        warnings.warn(f"lora_da_population is not set: LoRA-DA's population N falls back to lora_da_num_samples="
                      f"{population}; the reference uses the training-set size (pass lora_da_population=len(train))",
                      stacklevel=2)
    per_batch = max(1, batch_size_of(batches[0]))
    n_batches = -(-config.lora_da_num_samples // per_batch)
    groups = shared_input_groups(model, targets, batches[0], forward_fn)
    out = {}
    for chunk in chunk_groups(groups, targets, config.lora_da_max_bytes):
        accs: dict[str, FisherGradient] = {}
        for group in chunk:
            first = accs[group[0]] = FisherGradient()
            for name in group[1:]:
                accs[name] = FisherGradient(z=first.z)
        collect(model, {n: targets[n] for n in accs}, accs, itertools.cycle(batches), forward_fn,
                mask_fn=gradient_mask(config), max_batches=n_batches, desc="LoRA-DA: gradient and Fisher factors",
                progress=progress)
        for name in sorted(accs):
            acc = accs.pop(name)  # its G is freed as soon as the layer is solved
            out[name] = lora_da_factors(acc.grad, acc.z.value, acc.y, r=config.r, alpha=config.lora_da_alpha,
                                        beta=config.lora_da_beta, gamma=config.lora_da_gamma, population=population,
                                        damping=config.lora_da_damping, where=f" ({name})")
    return out


def init_lora_da(model: nn.Module, config: AdapterConfig, targets: dict[str, nn.Module], batches: list[Any],
                 forward_fn: ForwardFn, adapter_name: str, progress: bool) -> None:
    """LoRA-DA: the closed-form factors of :func:`lora_da_factors` per layer; the base weight is not changed."""
    factors = lora_da_init(model, targets, config, batches, forward_fn, progress)
    inject(model, config, sorted(targets), adapter_name)
    for name, layer in iter_lora_layers(model, adapter_name):
        set_lora(layer, adapter_name, *factors[name])

