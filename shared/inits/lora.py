"""Plain LoRA (Hu et al., arXiv 2106.09685) with peft's default init: A random (Kaiming-uniform), B = 0, so the
update γBA starts at zero. Also the start of LoRA-Dash, whose dash phase begins after t steps
(``docs/methods.md#lora``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..injection import inject
from ..statistics import ForwardFn

if TYPE_CHECKING:
    from ..config import AdapterConfig


def init_lora(model: nn.Module, config: AdapterConfig, targets: dict[str, nn.Module], batches: list[Any],
              forward_fn: ForwardFn, adapter_name: str, progress: bool) -> None:
    """peft's LoRA layers on ``targets`` with peft's default init; needs no data."""
    inject(model, config, sorted(targets), adapter_name)
