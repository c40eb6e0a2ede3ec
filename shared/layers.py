"""Access to peft LoRA layers in one orientation: weights as out × in, whatever the base layer stores.

peft's ``Linear`` wraps ``nn.Linear`` (weight out × in) and, with ``fan_in_fan_out=True``, transformers'
``Conv1D`` (weight in × out). Everything in the core works on W ∈ R^{out × in}.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator

import torch
from torch import nn

from . import quantization


@functools.cache
def _conv1d_type() -> type | None:
    """transformers' Conv1D (GPT-2 style, weight in × out), imported lazily: the core does not need transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_fan_in_fan_out(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_fan_in_fan_out(module)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear/Conv1D as out × in: a view, no copy; for a quantised layer (bitsandbytes 4/8-bit) the
    dequantised weight deq(Q(W)) it computes with, in fresh memory (:mod:`shared.quantization`)."""
    if quantization.is_quantized(module):
        return quantization.dequantized_weight(module)
    return module.weight.T if is_fan_in_fan_out(module) else module.weight


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or for a DTensor (a parameter sharded by FSDP2's ``fully_shard``) the gathered whole.

    Gathering is a collective: under FSDP2 every rank must make the same call.
    """
    return t.full_tensor() if is_dtensor(t) else t


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a DTensor, the type of a parameter sharded by FSDP2."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(module: nn.Module) -> bool:
    """True if any parameter of ``module`` is a DTensor (FSDP2): reads of it must then run on every rank."""
    return any(is_dtensor(p) for p in module.parameters())


def set_dense_weight(module: nn.Module, w_out_in: torch.Tensor) -> None:
    """Overwrite a Linear/Conv1D weight in place from an out × in matrix, keeping its dtype; a quantised layer stores
    Q(w) with its own quantisation settings (:func:`shared.quantization.requantize`)."""
    if quantization.is_quantized(module):
        quantization.requantize(module, w_out_in)
        return
    target = module.weight.data
    target.copy_((w_out_in.T if is_fan_in_fan_out(module) else w_out_in).to(target.dtype))


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear/Conv1D (a quantised layer's stored weight is packed, so its attributes say)."""
    if quantization.is_quantized(module):
        return quantization.in_out_features(module)
    w = dense_weight(module)
    return int(w.shape[1]), int(w.shape[0])


def matches(name: str, target_modules: list[str] | str) -> bool:
    """peft's matching rule: a regex string must full-match; list entries match the name or a dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


ALL_LINEAR = "all-linear"


def find_targets(model: nn.Module, target_modules: list[str] | str | None) -> dict[str, nn.Module]:
    """Full names of the modules that ``target_modules`` selects; a clear error when none match.

    ``"all-linear"`` (alone, or as the only list entry) is peft's shorthand: every Linear/Conv1D layer except the
    model's output embedding (``get_output_embeddings()``, e.g. ``lm_head``).
    """
    if target_modules is None:
        raise ValueError(
            "target_modules is not set; name the layers to adapt (or 'all-linear'). Linear layers of this model: "
            + ", ".join(linear_layer_names(model))
        )
    modules = dict(model_modules(model))
    if target_modules in (ALL_LINEAR, [ALL_LINEAR]):
        get_output = getattr(model, "get_output_embeddings", None)
        output = get_output() if callable(get_output) else None
        return {n: m for n, m in modules.items() if n and is_linear_like(m) and m is not output}
    found = {n: m for n, m in modules.items() if n and matches(n, target_modules)}
    if not found:
        raise ValueError(
            f"target_modules {target_modules!r} match no module of {type(model).__name__}. "
            f"Its linear layer names are: {', '.join(linear_layer_names(model))}"
        )
    return found


def model_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's own (name, module) pairs when it may already hold adapters: a peft layer stands for its base
    layer, and the internals of peft's wrappers (LoRA factors, ``modules_to_save`` copies) are left out."""
    from peft.tuners.tuners_utils import AuxiliaryTrainingWrapper, BaseTunerLayer

    inside = None  # name of the wrapper whose internals named_modules() is walking (depth-first)
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        inside = None
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            inside = name
            if isinstance(module, AuxiliaryTrainingWrapper):
                continue
            module = module.get_base_layer()
        yield name, module


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct last name components of the model's Linear/Conv1D layers (what users put in target_modules)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model_modules(model) if is_linear_like(m)})


def iter_lora_layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Module]]:
    """(name, peft LoraLayer) pairs of one adapter, names as in the un-adapted model."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


def nominal_scale(layer: nn.Module, adapter_name: str) -> float:
    """γ = α/r of one adapter of a peft LoRA layer as configured (α/√r with rsLoRA): the scale it trains at."""
    r, alpha = layer.r[adapter_name], layer.lora_alpha[adapter_name]
    return alpha / math.sqrt(r) if layer.use_rslora.get(adapter_name, False) else alpha / r


def runtime_factor(layer: nn.Module, adapter_name: str) -> float:
    """ρ = scaling / (α/r): the factor peft's ``scale_layer``, ``set_scale`` (``set_adapters`` weights) and diffusers'
    ``cross_attention_kwargs={"scale": ρ}`` put on the adapter at run time; 1 as trained."""
    return layer.scaling[adapter_name] / nominal_scale(layer, adapter_name)
