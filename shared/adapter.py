"""``attach``: put any method of the core on a torch model through peft, and the ``Adapter`` that drives it.

The LoRA layers are stock peft layers (``inject_adapter_in_model``, the model is adapted in place and
keeps its type). What the core adds lives in two small child modules of a peft layer:
``tsd_dash`` (:class:`shared.dash.DashTerm`) and ``tsd_init`` (:class:`InitOffset`, the frozen init
factors of methods that residualise W). Both exist from ``attach`` on, so optimizers, DDP/FSDP wrappers
and ``accelerator.save_state`` see every tensor from step 0.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Iterable

import torch
from torch import nn

from . import tsd
from .config import AdapterConfig
from .dash import DashTerm, DashVariant
from .layers import (dense_weight, find_targets, full_tensor, in_out_features, is_dtensor, is_fan_in_fan_out,
                     is_linear_like, iter_lora_layers, set_dense_weight)
from .statistics import ForwardFn, batch_size_of, default_forward_fn, require_loss


class InitOffset(nn.Module):
    """Frozen init factors of a method that residualised the base: W_res = W - γ B₀ A₀."""

    def __init__(self, A0: torch.Tensor, B0: torch.Tensor) -> None:
        super().__init__()
        self.A0 = nn.Parameter(A0.detach().clone().contiguous(), requires_grad=False)
        self.B0 = nn.Parameter(B0.detach().clone().contiguous(), requires_grad=False)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B₀, A₀) in fp32, gathered under FSDP2."""
        return full_tensor(self.B0).float(), full_tensor(self.A0).float()


class Adapter:
    """Handle on an adapted model: the dash schedule, the update algebra, diagnostics and state.

    Call :meth:`step` once per optimizer step (never per micro-batch or eval forward): at exactly
    ``dash_warmup_steps`` steps it runs the dash switch. :meth:`trainable_parameters` is the complete
    list for the optimizer from step 0.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        self.model = model
        self.config = config
        self.adapter_name = adapter_name
        self.layers: dict[str, nn.Module] = dict(iter_lora_layers(model, adapter_name))
        if not self.layers:
            raise ValueError("no LoRA layer of this adapter was found in the model")
        self.num_steps = 0

    # ------------------------------------------------------------------ training schedule
    @property
    def dash_layers(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.layers.items() if hasattr(m, "tsd_dash")}

    @property
    def switched(self) -> bool:
        layers = self.dash_layers
        return bool(layers) and all(m.tsd_dash.is_active for m in layers.values())

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Count one optimizer step; run the dash switch when the count reaches t. True if it switched now.

        Pass the optimizer to have its state for λ dropped at the switch, so Adam starts λ's moments
        fresh there, exactly as if λ had been created at the switch (the reference's behaviour).
        """
        self.num_steps += 1
        if self.config.uses_dash and not self.switched and self.num_steps >= self.config.dash_warmup_steps:
            self.switch(optimizer)
            return True
        return False

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimizer needs from step 0: LoRA A/B, dash λ, modules_to_save."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def switch(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """The LoRA-Dash switch (``lora_dash.md`` §2.1 and §9.3), once per layer.

        SVD of the original W (fp32, batched by shape), Δσ of the update since the original base from its
        factors, δ = |Δσ| / (σ + eps), I = top-s(δ); U_I, V_Iᵀ go into the pre-allocated frozen tensors.
        λ stays 0, so the function is unchanged.
        """
        layers = self.dash_layers
        if not layers:
            raise RuntimeError(f"method {self.config.method!r} has no dash phase")
        s = self.config.dash_directions
        for name, U, S, Vh in tsd.iter_svd(list(layers), self.original_weight, self._dense_shape):
            P, Q = self.update_factors(name)
            ds = tsd.delta_sigma(U, Vh, P, Q)
            idx = tsd.select_directions(tsd.change_rate(S, ds, self.config.dash_eps), s)
            energy = torch.tensor([tsd.energy_share(U[:, idx], Vh[idx], P, Q), _core_energy(ds, P, Q)])
            layers[name].tsd_dash.activate(U[:, idx], Vh[idx], idx, S, ds, energy)
        _broadcast_from_rank0([m.tsd_dash for m in layers.values()])
        if optimizer is not None:
            state = getattr(optimizer, "optimizer", optimizer).state
            for m in layers.values():
                state.pop(m.tsd_dash.lam, None)

    # ------------------------------------------------------------------ update algebra (all out × in, fp32)
    def _dense_shape(self, name: str) -> tuple[int, int]:
        return tuple(dense_weight(self.layers[name].get_base_layer()).shape)

    def scale(self, name: str) -> float:
        return float(self.layers[name].scaling[self.adapter_name])

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of a layer as stored by peft (B: out × r, A: r × in for linear layers); gathered under FSDP2."""
        layer = self.layers[name]
        return full_tensor(layer.lora_B[self.adapter_name].weight), full_tensor(layer.lora_A[self.adapter_name].weight)

    def original_weight(self, name: str) -> torch.Tensor:
        """The pretrained W (fp32, out × in): the stored base weight plus γ B₀ A₀ for residualised methods."""
        layer = self.layers[name]
        W = full_tensor(dense_weight(layer.get_base_layer()).detach()).to(torch.float32)
        if hasattr(layer, "tsd_init"):
            B0, A0 = layer.tsd_init.factors()
            W = W + self.scale(name) * (B0 @ A0)
        return W

    def update_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q) with P Q = the LoRA part of W_eff - W_original: [γB | -γB₀] [A ; A₀]."""
        layer = self.layers[name]
        B, A = (t.detach().float() for t in self.lora_factors(name))
        g = self.scale(name)
        if hasattr(layer, "tsd_init"):
            B0, A0 = layer.tsd_init.factors()
            return torch.cat([g * B, -g * B0], 1), torch.cat([A, A0], 0)
        return g * B, A

    def folded_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') of a plain LoRA with scale 1 whose B'A' is the whole update against the original base.

        Dash folds to [γB | U_I diag(λ)] [A ; V_Iᵀ] (``lora_dash.md`` §7); residualised inits add the
        -γB₀, A₀ block (peft's ``subtract_mutated_init`` trick).
        """
        layer = self.layers[name]
        B, A = (t.detach().float() for t in self.lora_factors(name))
        if A.dim() != 2:  # conv LoRA: plain LoRA only (attach refuses dash/inits there)
            return A.contiguous(), (self.scale(name) * B).contiguous()
        P, Q = self.update_factors(name)
        dash = getattr(layer, "tsd_dash", None)
        if dash is not None and dash.is_active:
            U, lam, Vh = (full_tensor(t.detach()).float() for t in (dash.U, dash.lam, dash.Vh))
            P = torch.cat([P, U * lam], 1)
            Q = torch.cat([Q, Vh], 0)
        return Q.contiguous(), P.contiguous()

    def delta_weight(self, name: str) -> torch.Tensor:
        """Dense W_eff - W_original (out × in, fp32); for tests and merging."""
        A, B = self.folded_factors(name)
        return B @ A

    # ------------------------------------------------------------------ diagnostics
    def tsd_report(self) -> list[tsd.LayerReport]:
        """See :func:`shared.tsd.report`."""
        rows: dict[str, tsd.LayerReport] = {}
        pending = []
        for name, layer in self.layers.items():
            dash = getattr(layer, "tsd_dash", None)
            if dash is not None and dash.is_active:
                rate = tsd.change_rate(dash.sigma, dash.delta_sigma, self.config.dash_eps)
                rows[name] = tsd.LayerReport(name, dash.sigma.clone(), dash.delta_sigma.clone(), rate,
                                             dash.indices.clone(), float(dash.energy[0]), float(dash.energy[1]))
            elif self.lora_factors(name)[1].dim() == 2:
                pending.append(name)
        for name, U, S, Vh in tsd.iter_svd(pending, self.original_weight, self._dense_shape):
            P, Q = self.update_factors(name)
            ds = tsd.delta_sigma(U, Vh, P, Q)
            rate = tsd.change_rate(S, ds, self.config.dash_eps)
            idx = tsd.select_directions(rate, min(self.config.dash_directions, S.numel()))
            rows[name] = tsd.LayerReport(name, S, ds, rate, idx, tsd.energy_share(U[:, idx], Vh[idx], P, Q),
                                         _core_energy(ds, P, Q))
        return [rows[n] for n in self.layers if n in rows]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter-level state not held by the model (for ``accelerator.register_for_checkpointing``)."""
        return {"num_steps": torch.tensor(self.num_steps, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Fold the whole update (LoRA, dash, init offset) into the base weights and remove the adapter."""
        for name, layer in self.layers.items():
            base = layer.get_base_layer()
            if not is_linear_like(base):
                raise NotImplementedError(f"merge_and_unload supports linear layers only ({name})")
            set_dense_weight(base, self.original_weight(name) + self.delta_weight(name))
            _replace_module(self.model, name, base)
        from peft.utils import ModulesToSaveWrapper

        for name, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                _replace_module(self.model, name, module.modules_to_save[self.adapter_name])
        self.layers = {}
        return self.model


def _core_energy(ds: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> float:
    """Σ Δσ_i² / ‖P Q‖_F²: share of the update on the core directions (``lora_dash.md`` §5)."""
    total = ((P.T @ P) * (Q @ Q.T)).sum()
    return float(ds.pow(2).sum() / total) if total > 0 else 0.0


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _broadcast_from_rank0(modules: list[DashTerm]) -> None:
    """Make every process use rank 0's directions (the SVDs agree already; this rules out driver drift)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for m in modules:
        for t in (m.U, m.Vh, m.indices, m.sigma, m.delta_sigma, m.energy):
            if not is_dtensor(t):  # FSDP2 shards were scattered from rank 0 already
                dist.broadcast(t.data, src=0)


# ---------------------------------------------------------------------------------------------- attach
def attach(model: nn.Module, config: AdapterConfig, *, data: Iterable[Any] | None = None,
           forward_fn: ForwardFn | None = None, adapter_name: str = "default", progress: bool = True) -> Adapter:
    """Adapt ``model`` in place with ``config.method`` and return its :class:`Adapter`.

    Data-driven inits (lora_init, tsd, eva, lora_da, lora_ga) read batches from ``data`` and call
    ``forward_fn(model, batch) -> loss`` (default ``model(**batch).loss``); gradient-based ones
    backpropagate it, EVA only runs the forward. Every check that needs no compute runs first.
    """
    config.validate()
    targets = find_targets(model, config.target_modules)
    _check_targets(targets, config)
    forward_fn = forward_fn or default_forward_fn
    batches = _take_batches(data, config) if config.needs_data else []

    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        method = config.method
        if method in ("lora", "dash"):
            _inject(model, config, sorted(targets))
        elif method == "pissa":
            _inject(model, config, sorted(targets), init="pissa")
            _record_offsets(model, adapter_name)
        elif method == "lora_ga":
            _init_lora_ga(model, config, targets, batches, forward_fn)
            _record_offsets(model, adapter_name)
        elif method == "eva":
            from .inits.eva import eva_components

            comps = eva_components(model, targets, config, batches, forward_fn, progress)
            _inject(model, config, sorted(comps), ranks={n: a.shape[0] for n, a in comps.items()})
            for name, layer in iter_lora_layers(model, adapter_name):
                _set_lora(layer, adapter_name, comps[name], torch.zeros_like(layer.lora_B[adapter_name].weight))
        elif method == "lora_da":
            from .inits.lora_da import lora_da_init

            factors = lora_da_init(model, targets, config, batches, forward_fn, progress)
            _inject(model, config, sorted(targets))
            for name, layer in iter_lora_layers(model, adapter_name):
                _set_lora(layer, adapter_name, *factors[name])
        else:  # lora_init, tsd
            _init_lora_init(model, config, targets, batches, forward_fn, adapter_name, progress)
        _cast_adapter(model, adapter_name, config)
        if config.uses_dash:
            _add_dash(model, adapter_name, config)
    return Adapter(model, config, adapter_name)


def _check_targets(targets: dict[str, nn.Module], config: AdapterConfig) -> None:
    needs_dense = config.method != "lora"
    for name, module in targets.items():
        if needs_dense and not is_linear_like(module):
            raise ValueError(
                f"method {config.method!r} needs Linear/Conv1D target layers; {name} is {type(module).__name__}"
            )
        if not is_linear_like(module):
            if not isinstance(module, nn.Conv2d):
                raise ValueError(f"target {name} is a {type(module).__name__}; only Linear/Conv1D/Conv2d are supported")
            continue
        d_in, d_out = in_out_features(module)
        k = min(d_in, d_out)
        if config.uses_dash and config.dash_directions > k:
            raise ValueError(
                f"dash_directions={config.dash_directions} is larger than min(out, in) = min({d_out}, {d_in}) = {k} "
                f"of target layer {name}"
            )
        if config.method in ("lora_init", "tsd", "pissa") and config.r > k:
            raise ValueError(f"r={config.r} is larger than min(out, in) = {k} of target layer {name}")


def _take_batches(data: Iterable[Any] | None, config: AdapterConfig) -> list[Any]:
    """The batches a data-driven init needs, read once (they are cycled when fewer)."""
    if data is None:
        raise ValueError(f"method {config.method!r} needs data=... (an iterable of batches) to initialise")
    it = iter(data)
    if config.method == "lora_da":
        out, samples = [], 0
        for batch in it:
            out.append(batch)
            samples += batch_size_of(batch)
            if samples >= config.lora_da_num_samples:
                break
    else:
        n = {"eva": config.eva_max_batches, "lora_ga": config.lora_ga_batches}.get(config.method, config.lora_init_steps)
        out = list(itertools.islice(it, n))
    if not out:
        raise ValueError(f"data is empty: method {config.method!r} needs at least one batch to initialise")
    return out


def _lora_config(config: AdapterConfig, names: list[str], ranks: dict[str, int] | None = None, init: Any = True,
                 fan_in_fan_out: bool = False):
    from peft import LoraConfig

    ranks = ranks or {}
    rank_pattern = {re.escape(n): r for n, r in ranks.items() if r != config.r}
    return LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=list(names),
        rank_pattern=rank_pattern,
        # EVA keeps the scale α/r when it changes a layer's rank (peft's adjust_scaling_factors)
        alpha_pattern={k: config.alpha * r / config.r for k, r in rank_pattern.items()},
        modules_to_save=config.modules_to_save, init_lora_weights=init, fan_in_fan_out=fan_in_fan_out,
    )


def _inject(model: nn.Module, config: AdapterConfig, names: list[str], ranks: dict[str, int] | None = None,
            init: Any = True, lora_config: Any = None) -> None:
    from peft import inject_adapter_in_model

    fifo = any(is_fan_in_fan_out(model.get_submodule(n)) for n in names)
    inject_adapter_in_model(lora_config or _lora_config(config, names, ranks, init, fifo), model)


@torch.no_grad()
def _set_lora(layer: nn.Module, adapter_name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    layer.lora_A[adapter_name].weight.copy_(A)
    layer.lora_B[adapter_name].weight.copy_(B)


@torch.no_grad()
def _record_offsets(model: nn.Module, adapter_name: str) -> None:
    """Keep the init factors of a base-mutating init (peft's PiSSA/LoRA-GA) for exact export later."""
    for _, layer in iter_lora_layers(model, adapter_name):
        layer.tsd_init = InitOffset(layer.lora_A[adapter_name].weight.float(), layer.lora_B[adapter_name].weight.float())


def _cast_adapter(model: nn.Module, adapter_name: str, config: AdapterConfig) -> None:
    if not config.autocast_adapter_dtype:
        return
    for _, layer in iter_lora_layers(model, adapter_name):
        for mod in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
            if mod.weight.dtype in (torch.float16, torch.bfloat16):
                mod.float()


def _add_dash(model: nn.Module, adapter_name: str, config: AdapterConfig) -> None:
    for _, layer in iter_lora_layers(model, adapter_name):
        d_in, d_out = in_out_features(layer.get_base_layer())
        ref = layer.lora_A[adapter_name].weight
        layer.tsd_dash = DashTerm(d_out, d_in, config.dash_directions, ref.dtype, ref.device)
        layer.lora_variant[adapter_name] = DashVariant()


def _init_lora_ga(model: nn.Module, config: AdapterConfig, targets: dict[str, nn.Module], batches: list[Any],
                  forward_fn: ForwardFn) -> None:
    """LoRA-GA through peft (``preprocess_loraga`` then the ``lora_ga`` init), as a baseline."""
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    fifo = any(is_fan_in_fan_out(m) for m in targets.values())
    lcfg = _lora_config(config, sorted(targets), init="lora_ga", fan_in_fan_out=fifo)
    lcfg.lora_ga_config = LoraGAConfig()

    def train_step() -> None:
        for batch in batches:
            require_loss(forward_fn(model, batch)).backward()

    preprocess_loraga(model, lcfg, train_step)
    _inject(model, config, sorted(targets), lora_config=lcfg)


@torch.no_grad()
def _init_lora_init(model: nn.Module, config: AdapterConfig, targets: dict[str, nn.Module], batches: list[Any],
                    forward_fn: ForwardFn, adapter_name: str, progress: bool) -> None:
    """LoRA-Init (``shared.inits.lora_init``): estimate δ, init on the top-r directions, residualise W."""
    from .inits.lora_init import gradient_updates, tsd_init_factors, warmup_lora

    names = sorted(targets)
    dense = None
    if config.lora_init_estimator == "gradient":
        with torch.enable_grad():
            dense = gradient_updates(model, targets, config, batches, forward_fn, progress)
    _inject(model, config, names)
    layers = dict(iter_lora_layers(model, adapter_name))
    if dense is None:
        with torch.enable_grad():
            params = [p for layer in layers.values() for p in
                      (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight)]
            warmup_lora(model, params, config, batches, forward_fn, progress)

    def weight_of(name: str) -> torch.Tensor:
        return dense_weight(layers[name].get_base_layer())

    for name, U, S, Vh in tsd.iter_svd(names, weight_of, lambda n: tuple(weight_of(n).shape)):
        layer = layers[name]
        scale = float(layer.scaling[adapter_name])
        if dense is None:
            B, A = layer.lora_B[adapter_name].weight.float(), layer.lora_A[adapter_name].weight.float()
            ds = tsd.delta_sigma(U, Vh, scale * B, A)
        else:
            ds = ((U.T @ dense[name]) * Vh).sum(1)
        idx = tsd.select_directions(tsd.change_rate(S, ds, config.dash_eps), config.r)
        A, B, removed = tsd_init_factors(U, S, Vh, idx, scale)
        _set_lora(layer, adapter_name, A, B)
        base = layer.get_base_layer()
        set_dense_weight(base, dense_weight(base).float() - removed)
        layer.tsd_init = InitOffset(A, B)
