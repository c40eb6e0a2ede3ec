"""The compact native format and :func:`load`: the full training state, restored exactly; plus the
frontends' training checkpoints (``checkpoint-<step>`` dirs written by ``accelerator.save_state``).

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
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import tsd
from .adapter import Adapter, InitOffset, _add_dash, _check_new_adapter, _inject, _set_lora, _unwrapped, residualise
from .config import AdapterConfig
from .errors import InputError
from .io import load_safetensors, save_safetensors
from .layers import full_tensor, in_out_features, iter_lora_layers, nominal_scale

NATIVE_WEIGHT_NAME = "tsd_adapter.safetensors"
FORMAT_VERSION = "2"
_DASH_KEYS = ("lam", "indices", "sigma", "delta_sigma", "energy")
#: tolerance of the singular-pair check of stored directions, relative to σ_1
PAIR_RTOL = 1e-3


def save_native(adapter: Adapter, out_dir: Path, write: bool) -> None:
    from .export import _modules_to_save_state

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
    for key, t in _modules_to_save_state(adapter).items():
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
        raise ValueError(f"{file} is not a tsd-lora native adapter (no tsd_config in its header)")
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
    names = sorted({k[len("layers."):].rsplit(".", 1)[0] for k in tensors if k.startswith("layers.") and k.endswith(".lora_A")})
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: adapter layer {name} does not exist in {type(model).__name__}") from None
        A, B = tensors[f"layers.{name}.lora_A"], tensors[f"layers.{name}.lora_B"]
        expected = (B.shape[0], A.shape[1])
        got = tuple(in_out_features(_unwrapped(module))[::-1])
        if expected != got:
            raise ValueError(f"{path}: layer {name} has shape (out, in) = {got} in the model but {expected} in the adapter")

    _check_new_adapter(model, adapter_name, config, names)
    ranks = {n: tensors[f"layers.{n}.lora_A"].shape[0] for n in names}
    _inject(model, config, names, adapter_name, ranks=ranks)
    layers = dict(iter_lora_layers(model, adapter_name))
    for name, layer in layers.items():
        _set_lora(layer, adapter_name, tensors[f"layers.{name}.lora_A"], tensors[f"layers.{name}.lora_B"])
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
        _add_dash(model, adapter_name, config)
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
    for name, U, S, Vh in tsd.iter_svd(sorted(set(active) - set(stored)), adapter.original_weight, adapter._dense_shape):
        t = {key: tensors[f"layers.{name}.dash.{key}"] for key in _DASH_KEYS}
        idx = t["indices"]
        if not torch.allclose(S[idx], t["sigma"][idx].to(S), rtol=1e-3, atol=1e-5):
            raise ValueError(f"{path}: the singular values of {name} differ from those the adapter was trained on; "
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
        raise ValueError(f"{path}: the dash directions of {name} are not singular vectors of the model's weight "
                         f"(residual {float(residual.max()):.3g} > {tol:.3g}); this is not the same base model")


def _load_modules_to_save(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    from peft.utils import ModulesToSaveWrapper

    prefix = "modules_to_save."
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            own = {k[len(prefix) + len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{prefix}{name}.")}
            if own:
                module.modules_to_save[adapter_name].load_state_dict(own)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """``output_dir/checkpoint-<step>`` directories, oldest first (partial ones are never listed)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(accelerator: Any, resume_from: str | None, output_dir: Path, marker: str,
                   overwrite: bool = False) -> Path | None:
    """The checkpoint to resume from: a directory, ``"latest"`` (None when there is none yet) or None.

    Everything is checked before any model loads:

    - ``marker`` is a sub-directory every checkpoint of the calling trainer has (a wrong path fails here);
    - the checkpoint's RNG state must load (:func:`check_rng_state`), or the resume would not be exact;
    - a new run (``resume_from`` None) into an ``output_dir`` that holds checkpoints of an earlier run is refused
      unless ``overwrite`` (``--overwrite_output_dir``), which deletes them: the new run would replace and prune
      them, and a later ``latest`` could resume the earlier run's newest one.
    """
    output_dir = Path(output_dir)
    if not resume_from:
        earlier = list_checkpoints(output_dir)
        if earlier and not overwrite:
            names = ", ".join(p.name for p in earlier[-3:])
            raise InputError(f"--output_dir {output_dir} holds checkpoints of an earlier run ({names}): continue it "
                             "with --resume_from_checkpoint latest, start over with --overwrite_output_dir (deletes "
                             "them), or pick another --output_dir")
        if earlier:
            accelerator.wait_for_everyone()  # every process has listed them before they go
            if accelerator.is_main_process:
                for path in earlier:
                    shutil.rmtree(path)
            accelerator.wait_for_everyone()
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            accelerator.print(f"no checkpoint in {output_dir}; starting a new run")
            return None
        path = found[-1]
    else:
        path = Path(resume_from)
        if not (path / marker).is_dir():
            raise InputError(f"--resume_from_checkpoint {path} is not a checkpoint of this trainer (no {marker}/ "
                             "inside)")
    check_rng_state(path, accelerator.process_index)
    return path


def check_rng_state(checkpoint: Path, process_index: int) -> None:
    """Raise unless ``checkpoint``'s RNG state for this process loads (with torch's weights-only unpickler).

    ``accelerator.load_state`` logs "Could not load random states" at INFO level and goes on when that file is
    corrupt or refused, and the resumed run then silently differs from the uninterrupted one. A missing file only
    warns, as the Trainer does: a run resumed on more processes than it was saved from has none for the new ones.
    """
    from accelerate.utils import load

    path = Path(checkpoint) / f"random_states_{process_index}.pkl"
    if not path.is_file():
        warnings.warn(f"{path} does not exist (was the run saved from fewer processes?): this process's RNG starts "
                      "afresh, so the resumed run will not repeat the interrupted one exactly", stacklevel=2)
        return
    try:
        states = load(path)
        missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(states)
    except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
        raise InputError(f"{path}: cannot restore the RNG state ({type(err).__name__}: {err}); a resume from "
                         f"{checkpoint} would not continue the interrupted run exactly") from err
    if missing:
        raise InputError(f"{path}: the RNG state lacks {sorted(missing)}; a resume from {checkpoint} would not "
                         "continue the interrupted run exactly")


def save_training_checkpoint(accelerator: Any, output_dir: Path, step: int, limit: int | None) -> Path:
    """``accelerator.save_state`` into a temp dir, renamed when complete; only then prune old checkpoints.

    A run killed while saving leaves the previous checkpoints intact and ``latest`` never picks the
    partial one.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if limit is not None:
            for old in list_checkpoints(output_dir)[:-limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
