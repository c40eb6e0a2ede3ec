"""Quantised base layers: bitsandbytes ``Linear4bit`` (NF4/FP4) and ``Linear8bitLt`` (LLM.int8), as transformers'
``BitsAndBytesConfig`` loads them (QLoRA, ``docs/text.md#qlora``).

The core works on W ∈ R^{out × in} in floating point (:mod:`shared.layers`). A quantised layer stores Q(W): 4-bit
codes with one absmax scale per block of 64 (or the configured block size; double quantisation stores those scales
in 8 bits again), or int8 rows with one scale per row. Three operations make such a layer usable by the core:

- :func:`dequantized_weight` reads deq(Q(W)), the weight the layer computes with (fresh memory, one layer at a
  time: the caller holds it only while it needs it);
- :func:`requantize` writes Q(W') with the layer's own settings (quant type, block size, double quantisation,
  storage dtype), so an init that residualises the base, W ← W - γ₀B₀A₀, is LoftQ-style on a quantised layer:
  dequantise, subtract, quantise the residual again (what that costs, ‖deq(Q(R)) - R‖_F / ‖R‖_F of the residual
  R, is recorded by :func:`shared.injection.residualise`). Quantisation is deterministic, so the same base and the
  same factors give the same stored bytes: a native reload rebuilds the requantised residual bit for bit.

bitsandbytes is imported only where a quantised model exists (it is then already imported), so the core does not
need it. On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight into a CPU-only layout at its first forward
without gradients (evaluation), rounding the block scales to bf16 and failing on layers narrower than a block;
:func:`pin_layout` keeps every 4-bit layer of a model in the standard layout, so training, evaluation, the inits
and the exports see one weight.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch import nn

from .errors import InputError


def _bnb_types() -> tuple[type, ...]:
    """(Linear4bit, Linear8bitLt) when bitsandbytes is imported; empty otherwise (no quantised layer can exist)."""
    if "bitsandbytes" not in sys.modules:
        return ()
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear layer."""
    types = _bnb_types()
    return bool(types) and isinstance(module, types)


def is_4bit(module: nn.Module) -> bool:
    types = _bnb_types()
    return bool(types) and isinstance(module, types[0])


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every quantised linear layer of ``model``."""
    for name, module in model.named_modules():
        if is_quantized(module):
            yield name, module


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a quantised layer, from its attributes: the stored 4-bit weight is packed (N·M/2 × 1)."""
    return int(module.in_features), int(module.out_features)


def _int8_scales(module: nn.Module) -> torch.Tensor:
    """The per-row scales of an 8-bit layer: in its matmul state once a forward ran, on the weight before."""
    scb = module.state.SCB
    return module.weight.SCB if scb is None else scb


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """deq(Q(W)) of a quantised layer, out × in, in the dtype it was quantised from (4-bit) or fp32 (8-bit)."""
    import bitsandbytes as bnb

    weight = module.weight
    if is_4bit(module):
        _check_standard_layout(module)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    return bnb.functional.int8_vectorwise_dequant(weight.data, _int8_scales(module).to(weight.device))


@torch.no_grad()
def requantize(module: nn.Module, w_out_in: torch.Tensor) -> None:
    """Store Q(``w_out_in``) in a quantised layer, in place, with the layer's quantisation settings."""
    import bitsandbytes as bnb

    weight = module.weight
    if is_4bit(module):
        _check_standard_layout(module)
        state = weight.quant_state
        data, new_state = bnb.functional.quantize_4bit(
            w_out_in.to(weight.device, state.dtype).contiguous(), blocksize=state.blocksize,
            compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=weight.data.dtype)
        weight.data = data
        weight.quant_state = module.quant_state = new_state
        return
    CB, SCB, _ = bnb.functional.int8_vectorwise_quant(w_out_in.to(weight.device, torch.float16).contiguous())
    weight.data = CB
    weight.CB = weight.SCB = None  # the layer's matmul state holds the codes and scales from here on
    module.state.CB, module.state.SCB = CB, SCB


def pin_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer of ``model`` in bitsandbytes' standard layout (see the module docstring).

    Raises if a layer was repacked already (an evaluation forward ran on the CPU before): its block scales are
    bf16-rounded then; load the model again and attach before evaluating.
    """
    for name, module in quantized_layers(model):
        if is_4bit(module):
            _check_standard_layout(module, name)
            module.support_avx512bf16_for_cpu = False


def _check_standard_layout(module: nn.Module, name: str = "") -> None:
    if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
        raise InputError(f"4-bit layer {name or type(module).__name__} was repacked by bitsandbytes' CPU inference "
                         "path (a forward without gradients ran before the adapter was attached), which rounded its "
                         "block scales to bf16; load the model again and attach the adapter before evaluating it")
