"""The LoRA-Dash term (Si et al., arXiv 2409.01035, Sec. 4; ``docs/methods.md#lora-dash``).

After the switch a LoRA layer computes

    y = W x + (α/r) B A drop(x) + U_I diag(λ) V_Iᵀ drop(x)

with U_I (n×s), V_Iᵀ (s×m) the top-s task-specific directions of the frozen W, frozen, and λ ∈ R^s
trainable and zero at the switch (so the function is unchanged there). The dash term has no α/r and
calls the LoRA dropout module on its own input, as the reference does.

Unlike the reference, every tensor exists from step 0 (DDP/FSDP register parameters at wrap time):
U_I and V_Iᵀ are frozen parameters filled in place at the switch (frozen parameters, not buffers, so
DDP does not broadcast them every step), and λ joins the autograd graph with a zero contribution before
the switch so DDP always sees its gradient. The term is computed inside peft's own forward by
:class:`DashVariant`, so everything peft does with a LoRA layer (mixed-adapter batches, disabling,
merging, runtime scales) includes it.

Each peft layer holds its terms in ``layer.tsd_dash``, an ``nn.ModuleDict`` keyed by adapter name, so
several adapters on one model keep their own directions.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from .layers import full_tensor, is_dtensor, runtime_factor


class DashTerm(nn.Module):
    """State of the dash term of one layer and adapter: λ, the directions, and the change rates seen at the switch.

    The term is active once the switch has filled U_I and V_Iᵀ. A slot stays empty (zero direction, index -1)
    when the weight has fewer than s numerically non-null directions: it then adds nothing and λ there gets a
    zero gradient. The switch diagnostics (``indices``, ``sigma``, ``delta_sigma``, ``energy``) are plain tensor
    attributes, not buffers: DDP broadcasts every registered buffer at every forward, and these never change
    after the switch. The native format (``shared.export_lora(..., format="tsd")``) saves and restores them.
    """

    def __init__(self, out_features: int, in_features: int, s: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.zeros(s, dtype=dtype, device=device))
        self.U = nn.Parameter(torch.zeros(out_features, s, dtype=dtype, device=device), requires_grad=False)
        self.Vh = nn.Parameter(torch.zeros(s, in_features, dtype=dtype, device=device), requires_grad=False)
        self.indices: torch.Tensor | None = None  # (s,) int64; -1 marks an empty slot
        self.sigma: torch.Tensor | None = None  # (k,) σ of the original W
        self.delta_sigma: torch.Tensor | None = None  # (k,) Δσ of the update at the switch
        self.energy: torch.Tensor | None = None  # (2,) update energy share on the selected and on all core directions
        self.is_active = False  # python flag: no device sync in forward
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_flag())

    def _sync_flag(self) -> None:
        """After ``load_state_dict``: active iff the loaded directions are set (a collective under FSDP2)."""
        self.is_active = bool(full_tensor(self.U).detach().ne(0).any())

    @property
    def num_directions(self) -> int:
        """Number of filled slots (s, or fewer on a weight with fewer non-null directions)."""
        return 0 if self.indices is None else int((self.indices >= 0).sum())

    @torch.no_grad()
    def activate(self, U_I: torch.Tensor, Vh_I: torch.Tensor, indices: torch.Tensor, sigma: torch.Tensor,
                 dsigma: torch.Tensor, energy: torch.Tensor) -> None:
        """Fill the first ``len(indices)`` slots with the directions, empty the rest, and turn the term on.

        λ stays as it is (zero at the switch, the loaded value at a reload).
        """
        s, k = self.lam.numel(), indices.numel()
        U = torch.zeros(U_I.shape[0], s, dtype=U_I.dtype, device=U_I.device)
        Vh = torch.zeros(s, Vh_I.shape[1], dtype=Vh_I.dtype, device=Vh_I.device)
        U[:, :k], Vh[:k] = U_I, Vh_I
        self.U.copy_(_layout_like(self.U, U))
        self.Vh.copy_(_layout_like(self.Vh, Vh))
        self.indices = torch.full((s,), -1, dtype=torch.long, device=U_I.device)
        self.indices[:k] = indices
        self.sigma, self.delta_sigma = sigma.float().clone(), dsigma.float().clone()
        self.energy = energy.float().clone()
        self.is_active = True

    def delta_weight(self) -> torch.Tensor:
        """U_I diag(λ) V_Iᵀ (out × in)."""
        return (self.U * self.lam) @ self.Vh


def _layout_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` laid out as ``param``: under FSDP2 a DTensor of its mesh and placements, scattered from rank 0."""
    if not is_dtensor(param):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)


class DashVariant(LoraVariant):
    """peft LoRA variant computing LoRA and dash in one low-rank product (the folding of ``docs/methods.md#lora-dash``).

    After the switch, with dropout off (p = 0 or eval), the update is one rank-(r+s) product

        y = W x + [γB | ρ U_I diag(λ)] ([A ; V_Iᵀ] x),    γ = scaling, ρ = γ / (α/r),

    added to the base output by a single ``addmm``. ρ is peft's runtime factor: 1 as trained, and whatever
    ``scale_layer``, ``set_scale`` (``set_adapters(..., weights)``) or diffusers' ``cross_attention_kwargs={"scale":
    ...}`` multiplied ``scaling`` by. The dash term follows it as γBA does, so a scaled live model equals the
    scaled export (which folds the dash term into B'A' at scale 1) and scale 0 gives the base. With dropout on,
    LoRA and dash each call the dropout module, as the reference does. Before the switch λ joins the graph through
    γB·(1 + 0·Σλ), never through the activations, so DDP sees its (zero) gradient at no cost. Because the term
    lives in peft's forward, ``adapter_names=`` mixed batches, ``disable_adapter()`` and peft's ``merge``/``unmerge``
    all include it. peft marks its variant API private, so the supported peft range is bounded in
    ``pyproject.toml``.
    """

    def supports_lora_conversion(self) -> bool:
        """False: peft's ``convert_to_lora``/``save_as_lora`` call the layer's ``get_delta_weight``, which knows only
        γBA, so they would silently drop the dash term; peft then refuses the model. ``shared.export_lora`` writes
        the exact rank-(r+s) LoRA instead."""
        return False

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to do: ``attach`` creates ``module.tsd_dash[adapter_name]`` before setting the variant."""

    @staticmethod
    def delta_weight(module: nn.Module, adapter_name: str) -> torch.Tensor:
        """γBA + ρ U_I diag(λ) V_Iᵀ in the base weight's layout (transposed for ``fan_in_fan_out``), fp32."""
        dash: DashTerm = module.tsd_dash[adapter_name]
        A = module.lora_A[adapter_name].weight.float()
        B = module.lora_B[adapter_name].weight.float()
        delta = module.scaling[adapter_name] * (B @ A)
        if dash.is_active:
            delta = delta + runtime_factor(module, adapter_name) * dash.delta_weight().float()
        return delta.T if module.fan_in_fan_out else delta

    @staticmethod
    def merge_safe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return (orig_weight.float() + DashVariant.delta_weight(module, active_adapter)).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = DashVariant.merge_safe(module, active_adapter, orig_weight.data)

    @staticmethod
    def unmerge(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return (orig_weight.float() - DashVariant.delta_weight(module, active_adapter)).to(orig_weight.dtype)

    @staticmethod
    def forward(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        dash: DashTerm = module.tsd_dash[active_adapter]
        A = module.lora_A[active_adapter].weight
        B = module.lora_B[active_adapter].weight
        gamma = module.scaling[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        x = x.to(A.dtype)
        shape = result.shape
        out = result.reshape(-1, shape[-1]).to(A.dtype)
        h = dropout(x).reshape(-1, x.shape[-1])
        if not dash.is_active:
            return torch.addmm(out, h @ A.T, (B * (gamma + dash.lam.sum() * 0)).T).view(shape)
        lam = dash.lam * runtime_factor(module, active_adapter)
        if isinstance(dropout, nn.Identity) or not dropout.training:
            A = torch.cat([A, dash.Vh], 0)
            B = torch.cat([B * gamma, dash.U * lam], 1)
            return torch.addmm(out, h @ A.T, B.T).view(shape)
        out = torch.addmm(out, h @ A.T, B.T, alpha=gamma)
        h = dropout(x).reshape(-1, x.shape[-1])
        return torch.addmm(out, (h @ dash.Vh.T) * lam, dash.U.T).view(shape)
