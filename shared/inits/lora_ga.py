"""LoRA-GA (Wang et al., arXiv 2407.05000) through peft: LoRA initialised from the SVD of the accumulated gradient,
with W residualised by the initial update. A baseline of the core; ``docs/methods.md#pissa-and-lora-ga``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..injection import add_offset, inject, make_lora_config
from ..layers import is_fan_in_fan_out, iter_lora_layers
from ..statistics import ForwardFn, require_loss

if TYPE_CHECKING:
    from ..config import AdapterConfig


def init_lora_ga(model: nn.Module, config: AdapterConfig, targets: dict[str, nn.Module], batches: list[Any],
                 forward_fn: ForwardFn, adapter_name: str, progress: bool) -> None:
    """LoRA-GA through peft (``preprocess_loraga`` then the ``lora_ga`` init), as a baseline.

    peft residualises W ← W - γ (B A) in fp32 from the factors as stored, the expression of :func:`residualise`.
    """
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    fifo = any(is_fan_in_fan_out(m) for m in targets.values())
    lcfg = make_lora_config(config, sorted(targets), init="lora_ga", fan_in_fan_out=fifo)
    lcfg.lora_ga_config = LoraGAConfig()

    def train_step() -> None:
        for batch in batches:
            require_loss(forward_fn(model, batch)).backward()

    preprocess_loraga(model, lcfg, train_step)
    inject(model, config, sorted(targets), adapter_name, lora_config=lcfg)
    for _, layer in iter_lora_layers(model, adapter_name):  # peft residualised W as residualise() does
        add_offset(layer, adapter_name)
