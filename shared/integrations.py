"""transformers integration: drive an :class:`shared.Adapter` from a stock ``Trainer``.

Import this module only when transformers is installed; the core itself does not need it.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .adapter import Adapter


class TSDCallback(TrainerCallback):
    """Calls ``adapter.step(optimizer)`` after every optimizer step of a ``transformers.Trainer``.

    ``on_step_end`` fires once per optimizer update (after all gradient-accumulation micro-batches) and
    never for evaluation, so the dash switch lands at exactly ``dash_warmup_steps`` optimizer steps. The Trainer's
    optimizer is accelerate's wrapper, whose ``step_was_skipped`` tells ``step`` about fp16 steps the GradScaler
    skipped; those do not count towards the switch.
    Build the Trainer's optimizer from ``adapter.trainable_parameters()`` (the Trainer's default, all
    parameters with ``requires_grad``, is the same set).
    """

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.adapter.step(optimizer)
        return control
