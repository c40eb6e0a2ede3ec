"""Exponential moving average of the adapters' trainable tensors (``--use_ema``, ``--ema_decay``).

The average runs over the tensors the optimizer trains and nothing else: the LoRA factors A and B and the dash
coefficients λ (the frozen base and the dash directions U, Vᵀ are not copied). It is diffusers' ``EMAModel``:
after optimizer step n the shadow θ̄ of every tensor θ becomes ``θ̄ ← d θ̄ + (1 - d) θ`` with
``d = min(ema_decay, (1 + k) / (10 + k))``, ``k = n - 1`` (``d = 0`` at the first step, so θ̄ starts at θ).

The EMA model is the adapter with θ̄ in place of θ: B̄ Ā for the LoRA part and λ̄ on the dash directions. Its
state (the shadows by parameter name and the step count) is written to checkpoints as safetensors, so a resumed
run continues the same average.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

import shared
from shared.errors import InputError
from shared.io import load_safetensors, save_safetensors

EMA_FILE = "ema.safetensors"


class AdapterEMA:
    """EMA of the trainable tensors of ``adapters`` (component name -> ``shared.Adapter``)."""

    def __init__(self, adapters: Mapping[str, shared.Adapter], decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.named: list[tuple[str, torch.nn.Parameter]] = []
        for component, adapter in adapters.items():
            trainable = {id(p) for p in adapter.trainable_parameters()}
            self.named += [(f"{component}.{name}", p) for name, p in adapter.model.named_parameters()
                           if id(p) in trainable]
        self.ema = EMAModel([p for _, p in self.named], decay=decay, foreach=True)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named]

    @property
    def num_steps(self) -> int:
        return self.ema.optimization_step

    def step(self) -> None:
        """Fold the current tensors into the average; call once per optimizer step."""
        self.ema.step(self.parameters)

    def shadows(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by parameter name (``<component>.<parameter name>``)."""
        return {name: s for (name, _), s in zip(self.named, self.ema.shadow_params, strict=True)}

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the adapters hold the averaged tensors; the trained ones are put back after."""
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            yield
        finally:
            self.ema.restore(self.parameters)

    def save(self, path: Path) -> None:
        """The shadows and the step count as a safetensors file."""
        meta = {"optimization_step": str(self.ema.optimization_step), "decay": repr(self.ema.decay),
                "names": json.dumps([n for n, _ in self.named])}
        save_safetensors({n: t.detach().contiguous() for n, t in self.shadows().items()}, Path(path), metadata=meta)

    def load(self, path: Path) -> None:
        """Restore what :meth:`save` wrote; a file of other tensors is an :class:`InputError` naming it."""
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_safetensors(path)
        names = [n for n, _ in self.named]
        if sorted(tensors) != sorted(names):
            raise InputError(f"{path}: its EMA tensors are not this run's trainable tensors (different method, rank "
                             "or --train_text_encoder?)")
        for name, p in self.named:
            if tensors[name].shape != p.shape:
                raise InputError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}")
        for (name, _), shadow in zip(self.named, self.ema.shadow_params, strict=True):
            shadow.copy_(tensors[name].to(shadow.device, shadow.dtype))
        self.ema.optimization_step = int(meta.get("optimization_step", 0))
