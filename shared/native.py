"""The compact native adapter format (``export_lora(..., format="tsd")``) and :func:`load`: the full training state
of one adapter, restored exactly.

``tsd_adapter.safetensors`` holds per layer A, B, the init factors and init scale γ₀ of residualised methods,
and the dash state: λ, the directions U_I and V_Iᵀ themselves, the indices I, σ and Δσ at the switch. A reload
uses the stored directions (an SVD of the base could return another basis where σ is degenerate or null, and
another device's SVD differs in the last bits) and checks that they are singular pairs of the model's base,
‖W v_i - σ_i u_i‖ and ‖Wᵀ u_i - σ_i v_i‖ ≤ 1e-3 σ_1, so an adapter trained on another base is refused. The
header carries the config and the step counts. Files of format 1 (no directions stored) are still read: their
directions are recomputed by SVD and checked against the stored σ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import tsd
from .adapter import Adapter
from .config import AdapterConfig
from .errors import InputError
from .injection import InitOffset, add_dash, check_new_adapter, inject, residualise, set_lora, unwrapped
from .io import load_safetensors, save_safetensors
from .layers import full_tensor, in_out_features, iter_lora_layers, nominal_scale

NATIVE_WEIGHT_NAME = "tsd_adapter.safetensors"
FORMAT_VERSION = "2"
_DASH_KEYS = ("lam", "indices", "sigma", "delta_sigma", "energy")
#: tolerance of the singular-pair check of stored directions, relative to σ_1
PAIR_RTOL = 1e-3


def save_native(adapter: Adapter, out_dir: Path, write: bool) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name in adapter.layers:
        B, A = adapter.lora_factors(name)
        tensors[f"layers.{name}.lora_A"] = A
        tensors[f"layers.{name}.lora_B"] = B
        offset = adapter.init_offset(name)
        if offset is not None:
            tensors[f"layers.{name}.A0"] = full_tensor(offset.A0)
            tensors[f"layers.{name}.B0"] = full_tensor(offset.B0)
            tensors[f"layers.{name}.init_scale"] = torch.tensor(offset.scale, dtype=torch.float64)
        dash = adapter.dash_term(name)
        if dash is not None and dash.is_active:
            if dash.indices is None:
                raise RuntimeError(f"the dash switch record of {name} is missing: the model came from load_state_dict, "
                                   "which restores the directions and λ but not the record; restore with shared.load")
            for key in _DASH_KEYS:
                tensors[f"layers.{name}.dash.{key}"] = full_tensor(getattr(dash, key))
            tensors[f"layers.{name}.dash.U"] = full_tensor(dash.U)
            tensors[f"layers.{name}.dash.Vh"] = full_tensor(dash.Vh)
    for key, t in adapter.modules_to_save_state().items():
        tensors[f"modules_to_save.{key}"] = t
    meta = {"format": "pt", "tsd_format_version": FORMAT_VERSION, "tsd_config": adapter.config.to_json(),
            "num_steps": str(adapter.num_steps), "num_updates": str(adapter.num_updates)}
    if write:
        save_safetensors(tensors, Path(out_dir) / NATIVE_WEIGHT_NAME, metadata=meta)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    file = path / NATIVE_WEIGHT_NAME if path.is_dir() else path
    tensors = load_safetensors(file)
    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    if "tsd_config" not in meta:
        raise InputError(f"{file} is not a tsd-lora native adapter (no tsd_config in its header)")
    return tensors, meta


@torch.no_grad()
def load(model: nn.Module, path: str | Path, *, adapter_name: str = "default") -> Adapter:
    """Attach the adapter saved at ``path`` (``export_lora(..., format="tsd")``) to a fresh ``model``.

    Restores A/B, the residualised base of lora_init/tsd/pissa/lora_ga (bit for bit), the post-switch dash state
    and the step counts exactly; runs no init and no selection. The loaded adapter becomes the active one, under
    ``adapter_name``. Raises naming the module when the model lacks a layer, its shapes differ from the adapter's,
    or its weights are not the ones the dash directions were chosen on.
    """
    path = Path(path)
    tensors, meta = _read(path)
    config = AdapterConfig.from_dict(json.loads(meta["tsd_config"]))
    names = sorted({k[len("layers."):].rsplit(".", 1)[0] for k in tensors
                    if k.startswith("layers.") and k.endswith(".lora_A")})
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"{path}: adapter layer {name} does not exist in {type(model).__name__}") from None
        A, B = tensors[f"layers.{name}.lora_A"], tensors[f"layers.{name}.lora_B"]
        expected = (B.shape[0], A.shape[1])
        got = tuple(in_out_features(unwrapped(module))[::-1])
        if expected != got:
            raise InputError(f"{path}: layer {name} has shape (out, in) = {got} in the model "
                             f"but {expected} in the adapter")

    check_new_adapter(model, adapter_name, config, names)
    ranks = {n: tensors[f"layers.{n}.lora_A"].shape[0] for n in names}
    inject(model, config, names, adapter_name, ranks=ranks)
    layers = dict(iter_lora_layers(model, adapter_name))
    for name, layer in layers.items():
        set_lora(layer, adapter_name, tensors[f"layers.{name}.lora_A"], tensors[f"layers.{name}.lora_B"])
        if f"layers.{name}.A0" in tensors:
            scale = tensors.get(f"layers.{name}.init_scale")
            offset = InitOffset(tensors[f"layers.{name}.A0"], tensors[f"layers.{name}.B0"],
                                nominal_scale(layer, adapter_name) if scale is None else float(scale))
            offset.to(layer.lora_A[adapter_name].weight.device)
            if not hasattr(layer, "tsd_init"):
                layer.tsd_init = nn.ModuleDict()
            layer.tsd_init[adapter_name] = offset
            residualise(layer, offset)
    _load_modules_to_save(model, adapter_name, tensors, path)
    if config.uses_dash:
        add_dash(model, adapter_name, config)
    adapter = Adapter(model, config, adapter_name)
    adapter.num_steps = int(meta.get("num_steps", 0))
    adapter.num_updates = int(meta.get("num_updates", adapter.num_steps))
    active = [n for n in names if f"layers.{n}.dash.indices" in tensors]
    stored = [n for n in active if f"layers.{n}.dash.U" in tensors]
    for name in stored:
        t = {key: tensors[f"layers.{name}.dash.{key}"] for key in (*_DASH_KEYS, "U", "Vh")}
        k = int((t["indices"] >= 0).sum())
        U, Vh = t["U"][:, :k].float(), t["Vh"][:k].float()
        _check_singular_pairs(path, name, adapter.original_weight(name), U, Vh, t["sigma"][t["indices"][:k]],
                              t["sigma"])
        _restore_dash(adapter.dash_term(name), t, U, Vh)
    # format 1: directions recomputed from the base by SVD, checked against the stored σ
    for name, U, S, Vh in tsd.iter_svd(sorted(set(active) - set(stored)), adapter.original_weight, adapter.dense_shape):
        t = {key: tensors[f"layers.{name}.dash.{key}"] for key in _DASH_KEYS}
        idx = t["indices"]
        if not torch.allclose(S[idx], t["sigma"][idx].to(S), rtol=1e-3, atol=1e-5):
            raise InputError(f"{path}: the singular values of {name} differ from those the adapter was trained on; "
                             "this is not the same base model")
        _restore_dash(adapter.dash_term(name), t, U[:, idx], Vh[idx])
    adapter.activate()
    return adapter


def _restore_dash(dash: Any, t: dict[str, torch.Tensor], U: torch.Tensor, Vh: torch.Tensor) -> None:
    k = U.shape[1]
    dash.lam.copy_(t["lam"])
    device = dash.U.device
    dash.activate(U.to(device), Vh.to(device), t["indices"][:k].to(device), t["sigma"].to(device),
                  t["delta_sigma"].to(device), t["energy"].to(device))


def _check_singular_pairs(path: Path, name: str, W: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor,
                          sigma_I: torch.Tensor, sigma: torch.Tensor) -> None:
    """Raise unless every stored (u_i, σ_i, v_i) is a singular triplet of ``W`` (out × in, fp32) up to
    :data:`PAIR_RTOL` σ_1: ‖W v_i - σ_i u_i‖ and ‖Wᵀ u_i - σ_i v_i‖."""
    U, Vh, sigma_I = U.to(W.device), Vh.to(W.device), sigma_I.to(W.device).float()
    residual = torch.maximum((W @ Vh.T - U * sigma_I).norm(dim=0), (W.T @ U - Vh.T * sigma_I).norm(dim=0))
    tol = PAIR_RTOL * float(sigma.max())
    if residual.numel() and float(residual.max()) > tol:
        raise InputError(f"{path}: the dash directions of {name} are not singular vectors of the model's weight "
                         f"(residual {float(residual.max()):.3g} > {tol:.3g}); this is not the same base model")


def _load_modules_to_save(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    from peft.utils import ModulesToSaveWrapper

    prefix = "modules_to_save."
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            own = {k[len(prefix) + len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{prefix}{name}.")}
            if own:
                module.modules_to_save[adapter_name].load_state_dict(own)
