"""The method registry: every method of the core, its init function and its traits, in one table.

:func:`shared.attach`, :class:`shared.AdapterConfig`'s checks, both trainers, the compare app and the benchmarks read
this table, so **adding a method is one file in ``shared/inits/`` plus one entry in :data:`METHODS`**: an init
``(model, config, targets, batches, forward_fn, adapter_name, progress) -> None`` that puts peft LoRA layers on
``targets`` (through :mod:`shared.injection`) and writes their factors, and the traits below. The math of each
method is in ``docs/methods.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .inits.eva import init_eva
from .inits.lora import init_lora
from .inits.lora_da import init_lora_da
from .inits.lora_ga import init_lora_ga
from .inits.lora_init import init_lora_init
from .inits.pissa import init_pissa

if TYPE_CHECKING:
    from .config import AdapterConfig

#: what an init reads from the data: nothing, layer inputs from forward passes, or gradients of the loss
STATISTICS = ("none", "forward", "gradient")


@dataclass(frozen=True)
class Method:
    """One method of the core.

    - ``init``: writes the adapter's initial state (see the module docstring);
    - ``statistics``: what the init reads from ``data`` (one of :data:`STATISTICS`; anything but ``"none"`` needs
      ``data=`` in :func:`shared.attach`);
    - ``data_budget``: how much of ``data`` the init reads, ``(n, "batches" | "samples")`` from the config;
    - ``residualises_base``: the init sets W ← W - γ₀B₀A₀ (the export subtracts γ₀B₀A₀ again, and the layer cannot
      take a second adapter);
    - ``dash_phase``: after ``dash_warmup_steps`` optimizer steps, LoRA-Dash's switch adds trainable coefficients on
      the top-s task-specific directions;
    - ``rank_from_weight``: the init takes r singular directions of W, so r ≤ min(out, in);
    - ``linear_only``: needs Linear/Conv1D targets (a dense W); plain LoRA also adapts Conv2d.
    """

    name: str
    init: Callable[..., None]
    statistics: str
    data_budget: Callable[[AdapterConfig], tuple[int, str]] | None
    residualises_base: bool
    dash_phase: bool
    rank_from_weight: bool
    linear_only: bool
    summary: str
    paper: str

    @property
    def needs_data(self) -> bool:
        return self.statistics != "none"


def _batches(field: str) -> Callable[[AdapterConfig], tuple[int, str]]:
    return lambda config: (getattr(config, field), "batches")


_PLAIN = dict(statistics="none", data_budget=None, residualises_base=False, rank_from_weight=False)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", init_lora, **_PLAIN, dash_phase=False, linear_only=False,
           summary="plain LoRA (peft's default init)", paper="Hu et al., arXiv 2106.09685"),
    Method("dash", init_lora, **_PLAIN, dash_phase=True, linear_only=True,
           summary="LoRA-Dash: LoRA, then trainable coefficients on the top-s task-specific directions",
           paper="Si et al., arXiv 2409.01035"),
    # the LoRA-Init estimators both read gradients (the warm-up trains on the loss, the other accumulates it)
    Method("lora_init", init_lora_init, statistics="gradient", data_budget=_batches("lora_init_steps"),
           residualises_base=True, dash_phase=False, rank_from_weight=True, linear_only=True,
           summary="LoRA-Init: LoRA initialised on the top-r task-specific directions, W residualised",
           paper="Si et al., arXiv 2409.01035 v5 (our reconstruction)"),
    Method("tsd", init_lora_init, statistics="gradient", data_budget=_batches("lora_init_steps"),
           residualises_base=True, dash_phase=True, rank_from_weight=True, linear_only=True,
           summary="LoRA-TSD: LoRA-Init, then the dash phase", paper="Si et al., arXiv 2409.01035 v5"),
    Method("eva", init_eva, statistics="forward", data_budget=_batches("eva_max_batches"), residualises_base=False,
           dash_phase=False, rank_from_weight=False, linear_only=True,
           summary="EVA: A from the SVD of layer inputs, ranks by explained variance",
           paper="Paischer et al., arXiv 2410.07170"),
    Method("lora_da", init_lora_da, statistics="gradient",
           data_budget=lambda config: (config.lora_da_num_samples, "samples"), residualises_base=False,
           dash_phase=False, rank_from_weight=False, linear_only=True,
           summary="LoRA-DA: closed-form init from a Fisher-gradient objective", paper="arXiv 2510.24561"),
    Method("pissa", init_pissa, statistics="none", data_budget=None, residualises_base=True, dash_phase=False,
           rank_from_weight=True, linear_only=True,
           summary="PiSSA: LoRA on the top-r singular directions of W, W residualised (through peft)",
           paper="Meng et al., arXiv 2404.02948"),
    Method("lora_ga", init_lora_ga, statistics="gradient", data_budget=_batches("lora_ga_batches"),
           residualises_base=True, dash_phase=False, rank_from_weight=False, linear_only=True,
           summary="LoRA-GA: LoRA from the SVD of the gradient, W residualised (through peft)",
           paper="Wang et al., arXiv 2407.05000"),
)}


def method(name: str) -> Method:
    """The registry entry of ``name``; ``KeyError`` naming the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def names(**traits: Any) -> list[str]:
    """The methods whose traits have these values, e.g. ``names(dash_phase=True)`` -> ``["dash", "tsd"]``."""
    return [m.name for m in METHODS.values() if all(getattr(m, k) == v for k, v in traits.items())]
