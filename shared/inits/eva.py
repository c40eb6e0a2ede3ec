"""EVA: Explained Variance Adaptation (Paischer et al., arXiv 2410.07170; ``docs/methods.md#eva``).

For every target layer the right singular vectors of its (masked) inputs are estimated by incremental
PCA (peft's ``IncrementalPCA``, a port of sklearn's: centred, randomized SVD with a fixed seed). After
each batch a layer counts as converged when the cosine similarity between successive components is at
least τ for all components it is currently allotted; as in peft, a converged layer's PCA is frozen until a
redistribution allots it more components than have converged. Ranks are redistributed over the global budget
R = Σ_ℓ r by pooling the first round(ρ r) explained-variance ratios of every layer and keeping the top R
(Sec. 3.2). Init: A = top-r'_ℓ components (rows divided by √σ_i with ``whiten``), B = 0, α scaled by r'/r
so the LoRA scale stays α/r. Unlike peft, the number of batches is capped (``eva_max_batches``).
"""

from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..injection import inject, set_lora
from ..layers import in_out_features, iter_lora_layers
from ..statistics import ForwardFn, collect, shared_input_groups, token_mask

if TYPE_CHECKING:
    from ..config import AdapterConfig


class EvaPCA:
    """Streaming PCA of one group of layers with identical inputs, with EVA's convergence test."""

    needs_grad = False

    def __init__(self, n_components: int, n_features: int, tau: float, seed: int) -> None:
        from peft.utils.incremental_pca import IncrementalPCA

        self.ipca = IncrementalPCA(n_components=n_components, copy=True, lowrank=True,
                                   lowrank_q=min(2 * n_components, n_features), lowrank_niter=4, lowrank_seed=seed)
        self.n_components = n_components
        self.tau = tau
        self.converged = torch.zeros(n_components, dtype=torch.bool)
        self.needed = n_components  # components the current rank distribution asks of this group
        self.fitted = False
        self.pending: list[torch.Tensor] = []

    def update(self, x: torch.Tensor, g: torch.Tensor | None, batch_size: int) -> None:
        if self.done(self.needed):
            return  # frozen while converged, as peft removes the hook (refitted if a redistribution asks for more)
        # layers that see few rows per batch (a pooler sees one per sequence) are buffered across batches:
        # a randomized SVD step needs at least 2k rows
        self.pending.append(x)
        rows = sum(t.shape[0] for t in self.pending)
        if rows < self.n_components * 2:
            return
        x = torch.cat(self.pending)
        self.pending = []
        prev = self.ipca.components_.clone() if self.fitted else None
        self.ipca.partial_fit(x)
        if prev is not None:
            cos = torch.nn.functional.cosine_similarity(prev, self.ipca.components_, dim=1).abs()
            self.converged = (cos >= self.tau).cpu()
        self.fitted = True

    def done(self, rank: int) -> bool:
        return self.fitted and bool(self.converged[:rank].all())


def redistribute_ranks(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """EVA's rank rule: pool every layer's explained-variance ratios, keep the top ``budget``, count per layer."""
    pooled = [(float(v), name) for name, vals in ratios.items() for v in vals]
    pooled.sort(key=lambda t: -t[0])
    ranks = {name: 0 for name in ratios}
    for _, name in pooled[:budget]:
        ranks[name] += 1
    return ranks


def eva_components(model: nn.Module, targets: dict[str, nn.Module], config: AdapterConfig, batches: list[Any],
                   forward_fn: ForwardFn, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per target layer the EVA matrix A (r'_ℓ × in); layers that get rank 0 are left out."""
    groups = shared_input_groups(model, targets, batches[0], forward_fn)
    accs: dict[str, EvaPCA] = {}
    max_rank: dict[str, int] = {}
    for group in groups:
        d_in = in_out_features(targets[group[0]])[0]
        k = min(max(1, round(config.eva_rho * config.r)), d_in)
        acc = EvaPCA(k, d_in, config.eva_tau, config.seed)
        for name in group:
            accs[name] = acc
            max_rank[name] = k
    budget = config.r * len(targets)
    ranks = {name: min(config.r, max_rank[name]) for name in targets}

    def all_converged() -> bool:
        nonlocal ranks
        if not all(a.fitted for a in accs.values()):
            return False
        ratios = {n: accs[n].ipca.explained_variance_ratio_[: max_rank[n]].cpu() for n in targets}
        ranks = redistribute_ranks(ratios, budget)
        for g in groups:
            accs[g[0]].needed = max(ranks[n] for n in g)
        return all(accs[g[0]].done(accs[g[0]].needed) for g in groups)

    n_used = collect(
        model, targets, accs, itertools.cycle(batches), forward_fn,
        mask_fn=lambda b: token_mask(b, config.eva_use_label_mask), max_batches=config.eva_max_batches,
        until=all_converged, desc="EVA: incremental SVD of layer inputs", progress=progress,
    )
    unfitted = [n for n in targets if not accs[n].fitted]
    if unfitted:
        raise ValueError(
            f"EVA saw too few unmasked tokens for layers {unfitted[:3]}: it needs at least 2*round(rho*r) = "
            f"{2 * max_rank[unfitted[0]]} rows within eva_max_batches={config.eva_max_batches} batches"
        )
    if not all_converged():
        warnings.warn(f"EVA stopped at the cap of {n_used} batches before every layer reached tau={config.eva_tau}",
                      stacklevel=2)
    out = {}
    for name in targets:
        r = ranks[name]
        if r == 0:
            continue
        ipca = accs[name].ipca
        A = ipca.components_[:r].clone()
        if config.eva_whiten:
            A = A / ipca.singular_values_[:r].sqrt().unsqueeze(1)
        out[name] = A
    return out


def init_eva(model: nn.Module, config: AdapterConfig, targets: dict[str, nn.Module], batches: list[Any],
             forward_fn: ForwardFn, adapter_name: str, progress: bool) -> None:
    """EVA: A = the top right-singular vectors of each layer's inputs, B = 0, ranks redistributed by explained
    variance (layers that get rank 0 are not adapted)."""
    comps = eva_components(model, targets, config, batches, forward_fn, progress)
    inject(model, config, sorted(comps), adapter_name, ranks={n: a.shape[0] for n, a in comps.items()})
    for name, layer in iter_lora_layers(model, adapter_name):
        set_lora(layer, adapter_name, comps[name], torch.zeros_like(layer.lora_B[adapter_name].weight))

