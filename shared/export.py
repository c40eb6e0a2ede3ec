"""Export any adapter as a standard LoRA that stock peft and stock diffusers load with no code of ours.

Every layer is written as (A', B') with scale 1 and B'A' = W_eff - W_original (:meth:`Adapter.folded_factors`):
dash folds to rank r+s, base-mutating inits to 2r (+s), so the file reproduces the trained model on the
*original* base exactly. The config written is minimal and explicit (``lora_alpha`` = rank per layer,
``init_lora_weights: true``): a data-driven init name there would make peft or diffusers re-run that init
on the loading model (``docs/core.md#export-formats``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .io import atomic_write_json, save_safetensors
from .layers import is_sharded
from .native import save_native

FORMATS = ("peft", "diffusers", "kohya", "tsd")
#: kohya's component prefixes for the diffusers component names
KOHYA_PREFIX = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def export_lora(adapter: Any, out_dir: str | Path, format: str = "peft", *, prefix: str = "unet",
                base_model_name_or_path: str | None = None, task_type: str | None = None,
                dtype: torch.dtype = torch.float32, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``adapter`` to ``out_dir`` in ``format``; returns the directory.

    Args:
        adapter: an :class:`shared.Adapter`, or for ``diffusers``/``kohya`` a mapping of diffusers
            component name (``unet``, ``text_encoder``, ``text_encoder_2``) to Adapter.
        format: ``peft`` (``adapter_model.safetensors`` + ``adapter_config.json`` for
            ``PeftModel.from_pretrained``), ``diffusers`` (``pytorch_lora_weights.safetensors`` for
            ``load_lora_weights``), ``kohya`` (the same file with kohya keys), or ``tsd`` (the compact
            native training state that :func:`shared.load` restores; dash directions are recomputed
            from the base at load).
        prefix: diffusers component name when a single adapter is given.
        metadata: extra safetensors header entries (str -> str) of the ``peft``, ``diffusers`` or ``kohya`` file,
            e.g. model-spec and training facts; the export's own keys win. A ``kohya`` file also gets
            ``ss_network_dim`` and ``ss_network_alpha``: the file's rank (the most common folded rank) and,
            at scale 1, the same alpha.

    Under FSDP2 (parameters sharded by ``fully_shard``) call it on every rank: the factors are gathered
    collectively and rank 0 writes.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    components = adapter if isinstance(adapter, Mapping) else {prefix: adapter}
    write = _writes_here(components.values())
    if write:
        out.mkdir(parents=True, exist_ok=True)
    extra = {str(k): str(v) for k, v in (metadata or {}).items()}
    if format == "tsd":
        save_native(_single(adapter, format), out, write)
    elif format == "peft":
        _write_peft(_single(adapter, format), out, base_model_name_or_path, task_type, dtype, write, extra)
    else:
        _write_diffusers(components, out, kohya=format == "kohya", dtype=dtype, write=write, extra=extra)
    return out


def _writes_here(adapters: Iterable[Any]) -> bool:
    """False only on ranks other than 0 of an FSDP2-sharded model: they gather with rank 0 but do not write."""
    dist = torch.distributed
    sharded = any(is_sharded(a.model) for a in adapters)
    return not sharded or dist.get_rank() == 0


def _single(adapter: Any, format: str) -> Any:
    if isinstance(adapter, Mapping):
        raise TypeError(f"format {format!r} takes one Adapter, not a mapping of components")
    return adapter


def folded_state(adapter: Any, dtype: torch.dtype = torch.float32) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (A', B')} of scale 1 for every adapted layer."""
    return {name: tuple(t.to(dtype) for t in adapter.folded_factors(name)) for name in adapter.layers}


def rank_config(ranks: Mapping[str, int]) -> dict[str, Any]:
    """r / lora_alpha / rank_pattern / alpha_pattern giving every layer its rank and scale 1."""
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): r for n, r in sorted(ranks.items()) if r != common}
    return {"r": common, "lora_alpha": common, "rank_pattern": pattern, "alpha_pattern": dict(pattern)}


def _write_peft(adapter: Any, out: Path, base: str | None, task_type: str | None, dtype: torch.dtype,
                write: bool, extra: dict[str, str]) -> None:
    from peft import LoraConfig

    folded = folded_state(adapter, dtype)
    tensors = {}
    for name, (A, B) in folded.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    for key, t in adapter.modules_to_save_state().items():
        tensors[f"base_model.model.{key}"] = t
    cfg = LoraConfig(target_modules=sorted(folded), modules_to_save=adapter.config.modules_to_save,
                     init_lora_weights=True, base_model_name_or_path=base, task_type=task_type,
                     **rank_config({n: A.shape[0] for n, (A, _) in folded.items()}))
    if not write:
        return
    save_safetensors(tensors, out / "adapter_model.safetensors", metadata={**extra, "format": "pt"})
    atomic_write_json(out / "adapter_config.json", _jsonable(cfg.to_dict()))


def _write_diffusers(components: Mapping[str, Any], out: Path, kohya: bool, dtype: torch.dtype, write: bool,
                     extra: dict[str, str]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    ranks: list[int] = []
    for comp, adapter in components.items():
        folded = folded_state(adapter, dtype)
        for name, (A, B) in folded.items():
            if kohya:
                if comp not in KOHYA_PREFIX:
                    raise ValueError(f"kohya export knows components {sorted(KOHYA_PREFIX)}, not {comp!r}")
                key = f"lora_{KOHYA_PREFIX[comp]}_{name.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"] = A
                tensors[f"{key}.lora_up.weight"] = B
                tensors[f"{key}.alpha"] = torch.tensor(float(A.shape[0]))
            else:
                tensors[f"{comp}.{name}.lora_A.weight"] = A
                tensors[f"{comp}.{name}.lora_B.weight"] = B
        cfg = {"target_modules": sorted(folded), "init_lora_weights": True, "use_dora": False, "lora_bias": False,
               **rank_config({n: A.shape[0] for n, (A, _) in folded.items()})}
        meta.update({f"{comp}.{k}": v for k, v in cfg.items()})
        ranks += [A.shape[0] for A, _ in folded.values()]
    header = {**extra, "format": "pt",
              "tsd_methods": json.dumps({c: a.config.method for c, a in components.items()})}
    if kohya:
        dim = Counter(ranks).most_common(1)[0][0]
        header.update(ss_network_dim=str(dim), ss_network_alpha=str(float(dim)))
    else:
        header["lora_adapter_metadata"] = json.dumps(meta, indent=2, sort_keys=True)
    if write:
        save_safetensors(tensors, out / DIFFUSERS_WEIGHT_NAME, metadata=header)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        items = [_jsonable(v) for v in obj]
        return sorted(items) if isinstance(obj, set) else items
    if hasattr(obj, "value") and isinstance(obj.value, str):  # enums
        return obj.value
    return obj
