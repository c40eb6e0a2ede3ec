"""The LoRA-Dash term (Si et al., arXiv 2409.01035, Sec. 4; ``lora_dash.md`` §2.1).

After the switch a LoRA layer computes

    y = W x + (α/r) B A drop(x) + U_I diag(λ) V_Iᵀ drop(x)

with U_I (n×s), V_Iᵀ (s×m) the top-s task-specific directions of the frozen W, frozen, and λ ∈ R^s
trainable and zero at the switch (so the function is unchanged there). The dash term has no α/r and
calls the LoRA dropout module on its own input, as the reference does.

Unlike the reference, every tensor exists from step 0 (DDP/FSDP register parameters at wrap time):
U_I and V_Iᵀ are frozen parameters filled in place at the switch (frozen parameters, not buffers, so
DDP does not broadcast them every step), and λ joins the autograd graph with a zero contribution before
the switch so DDP always sees its gradient.
"""

from __future__ import annotations

import torch
from torch import nn


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
        self.U.copy_(U_I)
        self.Vh.copy_(Vh_I)
        self.indices.copy_(indices)
        self.sigma.copy_(sigma)
        self.delta_sigma.copy_(dsigma)
        self.energy.copy_(energy)
        self.active.fill_(True)
        self.is_active = True

    def delta_weight(self) -> torch.Tensor:
        """U_I diag(λ) V_Iᵀ (out × in)."""
        return (self.U * self.lam) @ self.Vh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """U_I diag(λ) V_Iᵀ x for x of shape (..., in)."""
        return ((x @ self.Vh.T) * self.lam) @ self.U.T


def dash_forward_hook(adapter_name: str):
    """Forward hook for a peft LoRA layer that adds its ``tsd_dash`` term."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        dash: DashTerm = module.tsd_dash
        if module.disable_adapters or adapter_name not in module.active_adapters:
            return output
        if module.merged:
            if dash.is_active:
                raise RuntimeError(
                    "this LoRA layer was merged by peft, which does not know the dash term; use "
                    "Adapter.merge_and_unload() or shared.export_lora() instead"
                )
            return output
        if not dash.is_active:
            # keeps λ in the graph with a zero gradient, so DDP sees every parameter on every step
            return output + dash.lam.sum().to(output.dtype) * 0
        x = args[0]
        h = module.lora_dropout[adapter_name](x.to(dash.lam.dtype))
        return output + dash(h).to(output.dtype)

    return hook
