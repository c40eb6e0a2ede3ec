"""The LoRA-Dash term (Si et al., arXiv 2409.01035, Sec. 4; ``lora_dash.md`` §2.1).

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
merging) includes it.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from .layers import is_dtensor


class DashTerm(nn.Module):
    """State of the dash term of one layer: λ, the directions, and the change rates seen at the switch."""

    def __init__(self, out_features: int, in_features: int, s: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        k = min(out_features, in_features)
        self.lam = nn.Parameter(torch.zeros(s, dtype=dtype, device=device))
        self.U = nn.Parameter(torch.zeros(out_features, s, dtype=dtype, device=device), requires_grad=False)
        self.Vh = nn.Parameter(torch.zeros(s, in_features, dtype=dtype, device=device), requires_grad=False)
        self.register_buffer("indices", torch.zeros(s, dtype=torch.long, device=device))
        self.register_buffer("active", torch.zeros((), dtype=torch.bool, device=device))
        # diagnostics recorded at the switch (lora_dash.md §5)
        self.register_buffer("sigma", torch.zeros(k, dtype=torch.float32, device=device))
        self.register_buffer("delta_sigma", torch.zeros(k, dtype=torch.float32, device=device))
        # update energy share on the selected directions and on all core directions
        self.register_buffer("energy", torch.zeros(2, dtype=torch.float32, device=device))
        self.is_active = False  # python mirror of `active`: no device sync in forward
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_flag())

    def _sync_flag(self) -> None:
        self.is_active = bool(self.active)

    @torch.no_grad()
    def activate(self, U_I: torch.Tensor, Vh_I: torch.Tensor, indices: torch.Tensor, sigma: torch.Tensor,
                 dsigma: torch.Tensor, energy: torch.Tensor) -> None:
        """Fill the pre-allocated directions in place and turn the term on (λ stays as it is)."""
        self.U.copy_(_layout_like(self.U, U_I))
        self.Vh.copy_(_layout_like(self.Vh, Vh_I))
        self.indices.copy_(indices)
        self.sigma.copy_(sigma)
        self.delta_sigma.copy_(dsigma)
        self.energy.copy_(energy)
        self.active.fill_(True)
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
    """peft LoRA variant computing LoRA and dash in one low-rank product (``lora_dash.md`` §7).

    After the switch, with dropout off (p = 0 or eval), the update is one rank-(r+s) product

        y = W x + [γB | U_I diag(λ)] ([A ; V_Iᵀ] x),    γ = α/r,

    added to the base output by a single ``addmm``. With dropout on, LoRA and dash each call the dropout
    module, as the reference does. Before the switch λ joins the graph through γB·(1 + 0·Σλ), never
    through the activations, so DDP sees its (zero) gradient at no cost. Because the term lives in peft's
    forward, ``adapter_names=`` mixed batches, ``disable_adapter()`` and peft's ``merge``/``unmerge``
    all include it. peft marks its variant API private, so the supported peft range is bounded in
    ``pyproject.toml``.
    """

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to do: ``attach`` creates ``module.tsd_dash`` before setting the variant."""

    @staticmethod
    def delta_weight(module: nn.Module, adapter_name: str) -> torch.Tensor:
        """γBA + U_I diag(λ) V_Iᵀ in the base weight's layout (transposed for ``fan_in_fan_out``), fp32."""
        dash: DashTerm = module.tsd_dash
        A = module.lora_A[adapter_name].weight.float()
        B = module.lora_B[adapter_name].weight.float()
        delta = module.scaling[adapter_name] * (B @ A)
        if dash.is_active:
            delta = delta + dash.delta_weight().float()
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
        dash: DashTerm = module.tsd_dash
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
        if isinstance(dropout, nn.Identity) or not dropout.training:
            A = torch.cat([A, dash.Vh], 0)
            B = torch.cat([B * gamma, dash.U * dash.lam], 1)
            return torch.addmm(out, h @ A.T, B.T).view(shape)
        out = torch.addmm(out, h @ A.T, B.T, alpha=gamma)
        h = dropout(x).reshape(-1, x.shape[-1])
        return torch.addmm(out, (h @ dash.Vh.T) * dash.lam, dash.U.T).view(shape)
