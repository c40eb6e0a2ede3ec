"""``attach``: put any method of the core on a torch model through peft, and the ``Adapter`` that drives it.

The LoRA layers are stock peft layers (``inject_adapter_in_model``, the model is adapted in place and
keeps its type). What the core adds lives in two small ``nn.ModuleDict`` children of a peft layer, keyed by
adapter name like peft's own ``lora_A``/``lora_B`` (:mod:`shared.injection`): ``tsd_dash``
(:class:`shared.dash.DashTerm`) and ``tsd_init`` (:class:`shared.injection.InitOffset`, the frozen init factors of
methods that residualise W). Both exist from ``attach`` on, so optimizers, DDP/FSDP wrappers and
``accelerator.save_state`` see every tensor from step 0, and several adapters on one model keep their own state.
Each method's init and traits come from the registry :data:`shared.methods.METHODS`.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import tsd
from .bases import Record, SwitchBases
from .config import AdapterConfig
from .dash import DashTerm
from .distributed import check_identical
from .errors import InputError
from .injection import InitOffset, add_dash, check_new_adapter
from .layers import (
    dense_weight,
    find_targets,
    full_tensor,
    in_out_features,
    is_dtensor,
    is_linear_like,
    is_sharded,
    iter_lora_layers,
    nominal_scale,
    set_dense_weight,
)
from .quantization import pin_layout
from .statistics import ForwardFn, batch_size_of, default_forward_fn


class Adapter:
    """Handle on one adapter of an adapted model: the dash schedule, the update algebra, diagnostics and state.

    Call :meth:`step` once per optimizer step (never per micro-batch or eval forward): at exactly
    ``dash_warmup_steps`` applied updates it runs the dash switch. :meth:`trainable_parameters` is the complete
    list for the optimizer from step 0.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        self.model = model
        self.config = config
        self.adapter_name = adapter_name
        self.layers: dict[str, nn.Module] = dict(iter_lora_layers(model, adapter_name))
        if not self.layers:
            raise ValueError(f"no LoRA layer of adapter {adapter_name!r} was found in the model")
        self.num_steps = 0  # optimizer steps taken (step() calls), what the trainers' positions count
        self.num_updates = 0  # of which applied: not skipped by an fp16 GradScaler; drives the switch
        self.switch_bases: SwitchBases | None = None  # the switch's SVDs while computed ahead (config.dash_svd)

    # ------------------------------------------------------------------ per-layer state of this adapter
    def dash_term(self, name: str) -> DashTerm | None:
        """The dash term of layer ``name`` for this adapter (None for methods without dash)."""
        terms = getattr(self.layers[name], "tsd_dash", None)
        return terms[self.adapter_name] if terms is not None and self.adapter_name in terms else None

    def init_offset(self, name: str) -> InitOffset | None:
        """The init factors of layer ``name`` for this adapter (None unless the method residualised W)."""
        offsets = getattr(self.layers[name], "tsd_init", None)
        return offsets[self.adapter_name] if offsets is not None and self.adapter_name in offsets else None

    def activate(self) -> None:
        """Make this adapter the model's active one (peft's ``set_adapter``): only its LoRA factors and dash λ
        compute and train; the other adapters' stay on the model, frozen and inactive."""
        from peft.functional import set_adapter

        set_adapter(self.model, self.adapter_name)
        for module in self.model.modules():
            for name, term in getattr(module, "tsd_dash", {}).items():
                term.lam.requires_grad_(name == self.adapter_name)

    # ------------------------------------------------------------------ training schedule
    @property
    def dash_layers(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.layers.items() if self.dash_term(n) is not None}

    @property
    def switched(self) -> bool:
        names = list(self.dash_layers)
        return bool(names) and all(self.dash_term(n).is_active for n in names)

    def step(self, optimizer: torch.optim.Optimizer | None = None, *, skipped: bool | None = None) -> bool:
        """Count one optimizer step; run the dash switch when the applied updates reach t. True if it switched now.

        A step that an fp16 ``GradScaler`` skipped (inf/NaN gradients) is not an update: it counts in
        ``num_steps`` but not towards the switch. ``skipped`` defaults to ``optimizer.step_was_skipped`` (accelerate's
        optimizer wrapper, which the transformers Trainer uses too); with a bare ``torch.amp.GradScaler`` pass
        ``skipped=scaler.get_scale() < scale_before_update``.

        Pass the optimizer to have its state for λ dropped at the switch, so Adam starts λ's moments
        fresh there, exactly as if λ had been created at the switch (the reference's behaviour).
        """
        if skipped is None:
            skipped = bool(getattr(optimizer, "step_was_skipped", False))
        self.num_steps += 1
        if skipped:
            return False
        self.num_updates += 1
        if self.config.uses_dash and not self.switched:
            if self.num_updates >= self.config.dash_warmup_steps:
                self.switch(optimizer)
                return True
            self.prepare_switch()
        return False

    def prepare_switch(self) -> None:
        """Start the SVDs the dash switch projects onto, as ``config.dash_svd`` says (:mod:`shared.bases`): in a
        background thread ("background"), or now ("upfront"); nothing for "switch", after the switch, or when they
        have started already. :meth:`step` calls it at the first optimizer step; call it yourself to start earlier,
        once the model is on the device it trains on (the SVDs run on the weights' device). Under FSDP2 reading a
        weight is a collective, so "background" leaves the SVDs to the switch there."""
        if (not self.config.uses_dash or self.switched or self.switch_bases is not None
                or self.config.dash_svd == "switch"):
            return
        bases = self._new_switch_bases()
        background = self.config.dash_svd == "background"
        if background and bases.collective:
            return
        bases.start(background=background)
        self.switch_bases = bases

    def param_groups(self, lr: float, **options: Any) -> list[dict[str, Any]]:
        """Optimizer parameter groups of :meth:`trainable_parameters`: everything at ``lr``, and the dash
        coefficients λ in a group of their own at ``dash_lr_ratio * lr`` (one group when the ratio is 1 or the
        method has no dash phase). ``options`` (e.g. ``weight_decay``) go into every group. Pass the result to any
        torch optimizer; schedulers scale every group's lr alike, so the ratio holds throughout."""
        params = self.trainable_parameters()
        lam = {id(t.lam) for n in self.layers if (t := self.dash_term(n)) is not None}
        ratio = self.config.dash_lr_ratio
        if not lam or ratio == 1:
            return [{"params": params, "lr": lr, **options}]
        return [{"params": [p for p in params if id(p) not in lam], "lr": lr, **options},
                {"params": [p for p in params if id(p) in lam], "lr": lr * ratio, **options}]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter of this adapter the optimizer needs from step 0: LoRA A/B, dash λ, modules_to_save."""
        from peft.utils import ModulesToSaveWrapper

        own: list[torch.Tensor] = []
        for name, layer in self.layers.items():
            own += (list(layer.lora_A[self.adapter_name].parameters())
                    + list(layer.lora_B[self.adapter_name].parameters()))
            term = self.dash_term(name)
            if term is not None:
                own.append(term.lam)
        for module in self.model.modules():
            if isinstance(module, ModulesToSaveWrapper) and self.adapter_name in module.modules_to_save:
                own += list(module.modules_to_save[self.adapter_name].parameters())
        ids = {id(p) for p in own}
        return [p for p in self.model.parameters() if id(p) in ids and p.requires_grad]

    @torch.no_grad()
    def switch(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """The LoRA-Dash switch (``docs/methods.md#lora-dash``), once per layer.

        SVD of the original W (fp32, batched by shape; computed ahead per ``config.dash_svd``, :mod:`shared.bases`),
        Δσ of the update since the original base from its factors, δ = |Δσ| / (σ + eps), I = top-s(δ) among the
        non-null directions (:func:`shared.tsd.non_null`); U_I, V_Iᵀ go into the pre-allocated frozen tensors. λ
        stays 0, so the function is unchanged. Under several processes each rank selects on the layers whose SVDs
        it computed, and every layer's selection is broadcast from there.
        """
        layers = self.dash_layers
        if not layers:
            raise RuntimeError(f"method {self.config.method!r} has no dash phase")
        bases, self.switch_bases = self.switch_bases or self._new_switch_bases(), None
        try:
            records = {name: self._select(name, U, S, Vh) for name, U, S, Vh in bases.owned()}
            records = bases.share(records, {n: self.dense_shape(n) for n in layers}, self.config.dash_directions)
        finally:
            bases.close()
        for name in bases.names:
            self.dash_term(name).activate(*records[name])
        if optimizer is not None:
            self._reset_lambda_state(optimizer, [self.dash_term(n) for n in layers])

    def _select(self, name: str, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> Record:
        """The switch's selection on one layer from the SVD of its original W: (U_I, V_Iᵀ, I, σ, Δσ, energy)."""
        P, Q = self.update_factors(name)
        ds = tsd.delta_sigma(U, Vh, P, Q)
        valid = tsd.non_null(S, self.dense_shape(name))
        idx = tsd.select_directions(tsd.change_rate(S, ds, self.config.dash_eps), self.config.dash_directions, valid)
        energy = torch.tensor([tsd.energy_share(U[:, idx], Vh[idx], P, Q), _core_energy(ds, P, Q)])
        return U[:, idx], Vh[idx], idx, S, ds, energy

    def _new_switch_bases(self) -> SwitchBases:
        layers = self.dash_layers
        first = next(iter(layers.values())).get_base_layer()
        return SwitchBases(list(layers), self.original_weight, self.dense_shape, self._weight_state,
                           dense_weight(first).device, cache_dir=self.config.dash_svd_cache_dir,
                           collective=any(is_sharded(layer) for layer in layers.values()))

    def _weight_state(self, name: str) -> list[tuple[int, int, int]]:
        """Identity, storage and in-place version of every tensor :meth:`original_weight` reads for layer ``name``."""
        layer = self.layers[name]
        tensors = [layer.get_base_layer().weight]
        for offset in getattr(layer, "tsd_init", {}).values():
            tensors += [offset.A0, offset.B0]
        return [(id(t), (t.to_local() if is_dtensor(t) else t).data_ptr(), t._version) for t in tensors]

    def _reset_lambda_state(self, optimizer: Any, terms: list[DashTerm]) -> None:
        """Drop the optimizer's state for λ. Where the state is not keyed by parameter (DeepSpeed ZeRO-1/2 keeps it
        per flat partition) that is impossible: warn. λ's gradient is exactly zero before the switch, so its Adam
        moments are zero there and only Adam's bias correction differs from a fresh start: at t warm-up steps the
        first λ update is (1-β₁)/(1-β₁^(t+1)) / sqrt((1-β₂)/(1-β₂^(t+1))) of a fresh one (0.98 at t = 100)."""
        state = getattr(getattr(optimizer, "optimizer", optimizer), "state", None)
        for term in terms:
            if state is not None:
                state.pop(term.lam, None)
        if state is None or (state and not any(p in state for p in self.trainable_parameters())):
            warnings.warn("the optimizer's state is not keyed by this adapter's parameters (DeepSpeed ZeRO keeps it "
                          "per flat partition), so λ's Adam state could not be reset at the dash switch; its moments "
                          "are zero there, and only Adam's bias correction differs (first λ update about 0.98 of a "
                          "fresh start at t = 100)", stacklevel=4)

    def modules_to_save_state(self) -> dict[str, torch.Tensor]:
        """The state of this adapter's ``modules_to_save`` copies (e.g. a trained classifier head), by module path;
        gathered under FSDP2."""
        from peft.utils import ModulesToSaveWrapper

        out = {}
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                for key, t in module.modules_to_save[self.adapter_name].state_dict().items():
                    out[f"{name}.{key}"] = full_tensor(t)
        return out

    # ------------------------------------------------------------------ update algebra (all out × in, fp32)
    def dense_shape(self, name: str) -> tuple[int, int]:
        """(out, in) of layer ``name``'s weight."""
        return tuple(in_out_features(self.layers[name].get_base_layer())[::-1])

    def scale(self, name: str) -> float:
        """γ = α/r of layer ``name`` as trained (peft's runtime scale factors are not part of the adapter)."""
        return nominal_scale(self.layers[name], self.adapter_name)

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) of a layer as stored by peft (B: out × r, A: r × in for linear layers); gathered under FSDP2."""
        layer = self.layers[name]
        return full_tensor(layer.lora_B[self.adapter_name].weight), full_tensor(layer.lora_A[self.adapter_name].weight)

    def original_weight(self, name: str) -> torch.Tensor:
        """The pretrained W (fp32, out × in): the stored base weight plus γ₀ B₀ A₀ of every adapter that
        residualised it.

        On a quantised base (bitsandbytes 4/8-bit) the stored weight is read dequantised, deq(Q(W)), one layer per
        call; after a residualising init it is deq(Q(W_res)) + γ₀B₀A₀, which differs from deq(Q(W)) by the
        residual's requantisation error (:meth:`residual_errors`).

        Raises while peft has merged an adapter into the layer (the stored weight then holds its update).
        """
        layer = self.layers[name]
        if layer.merged:
            raise RuntimeError(f"layer {name} has adapters merged into its weight (peft merge()); unmerge() first")
        W = full_tensor(dense_weight(layer.get_base_layer()).detach()).to(torch.float32)
        for offset in getattr(layer, "tsd_init", {}).values():
            W = W + offset.product().to(W.device)
        return W

    def update_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q) with P Q = the LoRA part of W_eff - W_original: [γB | -γ₀B₀] [A ; A₀]."""
        B, A = (t.detach().float() for t in self.lora_factors(name))
        g = self.scale(name)
        offset = self.init_offset(name)
        if offset is not None:
            B0, A0 = offset.factors()
            return torch.cat([g * B, -offset.scale * B0], 1), torch.cat([A, A0], 0)
        return g * B, A

    def folded_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B') of a plain LoRA with scale 1 whose B'A' is the whole update against the original base.

        Dash folds to [γB | U_I diag(λ)] [A ; V_Iᵀ] (``docs/methods.md#lora-dash``); residualised inits add the
        -γ₀B₀, A₀ block (peft's ``subtract_mutated_init`` trick). The adapter as trained: a runtime scale ρ on the
        live model corresponds to loading this export at scale ρ.
        """
        B, A = (t.detach().float() for t in self.lora_factors(name))
        if A.dim() != 2:  # conv LoRA: plain LoRA only (attach refuses dash/inits there)
            return A.contiguous(), (self.scale(name) * B).contiguous()
        P, Q = self.update_factors(name)
        dash = self.dash_term(name)
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
    def residual_errors(self) -> dict[str, float]:
        """Per residualised layer, ‖stored W_res - W_res‖_F / ‖W_res‖_F: 0 on an fp32 base, the rounding of a
        bf16/fp16 base, the requantisation error of a quantised one (``docs/text.md#qlora``)."""
        return {n: o.residual_error for n in self.layers if (o := self.init_offset(n)) is not None}

    @torch.no_grad()
    def fingerprint(self) -> torch.Tensor:
        """float64 sums, per layer, of what the init wrote: A, B, and for a residualised layer B₀, A₀ and the stored
        base (every tensor of its state, so codes and scales on a quantised one). :func:`attach` compares it across
        processes."""
        sums = []
        for name, layer in self.layers.items():
            tensors = [*self.lora_factors(name)]
            if self.init_offset(name) is not None:
                tensors += [*self.init_offset(name).factors(), *layer.get_base_layer().state_dict().values()]
            sums.append(torch.stack([full_tensor(t).detach().double().sum().cpu() for t in tensors
                                     if isinstance(t, torch.Tensor)]).sum())
        return torch.stack(sums)

    def tsd_report(self) -> list[tsd.LayerReport]:
        """See :func:`shared.tsd.report`."""
        rows: dict[str, tsd.LayerReport] = {}
        pending = []
        for name in self.layers:
            dash = self.dash_term(name)
            if dash is not None and dash.is_active and dash.indices is not None:
                rate = tsd.change_rate(dash.sigma, dash.delta_sigma, self.config.dash_eps)
                idx = dash.indices[dash.indices >= 0]
                rows[name] = tsd.LayerReport(name, dash.sigma.clone(), dash.delta_sigma.clone(), rate, idx.clone(),
                                             float(dash.energy[0]), float(dash.energy[1]))
            elif self.lora_factors(name)[1].dim() == 2:
                pending.append(name)
        for name, U, S, Vh in tsd.iter_svd(pending, self.original_weight, self.dense_shape):
            P, Q = self.update_factors(name)
            ds = tsd.delta_sigma(U, Vh, P, Q)
            rate = tsd.change_rate(S, ds, self.config.dash_eps)
            idx = tsd.select_directions(rate, min(self.config.dash_directions, S.numel()),
                                        tsd.non_null(S, self.dense_shape(name)))
            rows[name] = tsd.LayerReport(name, S, ds, rate, idx, tsd.energy_share(U[:, idx], Vh[idx], P, Q),
                                         _core_energy(ds, P, Q))
        return [rows[n] for n in self.layers if n in rows]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter-level state not held by the model (for ``accelerator.register_for_checkpointing``)."""
        return {"num_steps": torch.tensor(self.num_steps, dtype=torch.int64),
                "num_updates": torch.tensor(self.num_updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_steps = int(state["num_steps"])
        self.num_updates = int(state.get("num_updates", self.num_steps))

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Fold the whole update (LoRA, dash, init offset) into the base weights and remove the adapter.

        The adapter is folded as trained (scale 1, like :func:`shared.export_lora`). A layer that peft has merged
        (``merge()``) is unmerged first, so its update is added once. A layer that also holds another adapter is
        refused: replacing it by its base layer would drop that adapter.
        """
        for name, layer in self.layers.items():
            others = sorted(set(layer.lora_A) - {self.adapter_name})
            if others:
                raise ValueError(f"layer {name} also holds adapter(s) {others}; merge_and_unload would remove them")
            if not is_linear_like(layer.get_base_layer()):
                raise NotImplementedError(f"merge_and_unload supports linear layers only ({name})")
        for name, layer in self.layers.items():
            if layer.merged:
                layer.unmerge()
            base = layer.get_base_layer()
            set_dense_weight(base, self.original_weight(name) + self.delta_weight(name))
            _replace_module(self.model, name, base)
        from peft.utils import ModulesToSaveWrapper

        for name, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                _replace_module(self.model, name, module.modules_to_save[self.adapter_name])
        self.layers = {}
        return self.model


def _core_energy(ds: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> float:
    """Σ Δσ_i² / ‖P Q‖_F²: share of the update on the core directions (``docs/methods.md#lora-dash``)."""
    total = ((P.T @ P) * (Q @ Q.T)).sum()
    return float(ds.pow(2).sum() / total) if total > 0 else 0.0


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ---------------------------------------------------------------------------------------------- attach
def attach(model: nn.Module, config: AdapterConfig, *, data: Iterable[Any] | None = None,
           forward_fn: ForwardFn | None = None, adapter_name: str = "default", progress: bool = True) -> Adapter:
    """Adapt ``model`` in place with ``config.method`` and return its :class:`Adapter`.

    Data-driven inits (lora_init, tsd, eva, lora_da, lora_ga) read batches from ``data`` and call
    ``forward_fn(model, batch) -> loss`` (default ``model(**batch).loss``); gradient-based ones
    backpropagate it, EVA only runs the forward. Every check that needs no compute runs first.

    A model may hold several adapters under different ``adapter_name``s; the one attached last is the active
    one (:meth:`Adapter.activate` switches).

    Under DDP (an initialised process group of several ranks) a data-driven init pools its statistics across the
    processes, so every rank must call ``attach``, each with its own batches, and every rank ends with the same
    adapter: a fingerprint (:meth:`Adapter.fingerprint`) is compared across ranks at the end, and a difference
    raises (``docs/distributed.md#pooled-init-statistics``). A quantised model (bitsandbytes 4/8-bit) keeps its
    4-bit layers in bitsandbytes' standard layout from here on (:func:`shared.quantization.pin_layout`).
    """
    config.validate()
    spec = config.spec
    targets = find_targets(model, config.target_modules)
    check_new_adapter(model, adapter_name, config, list(targets))
    _check_targets(targets, config)
    _check_svd_cache_dir(config)
    batches = _take_batches(data, config) if spec.needs_data else []
    pin_layout(model)
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        spec.init(model, config, targets, batches, forward_fn or default_forward_fn, adapter_name, progress)
        if spec.dash_phase:
            add_dash(model, adapter_name, config)
    adapter = Adapter(model, config, adapter_name)
    adapter.activate()
    if spec.needs_data:
        check_identical(adapter.fingerprint(), f"the {config.method} init")
    return adapter


def _check_targets(targets: dict[str, nn.Module], config: AdapterConfig) -> None:
    spec = config.spec
    for name, module in targets.items():
        if spec.linear_only and not is_linear_like(module):
            raise InputError(f"method {config.method!r} needs Linear/Conv1D target layers; {name} is "
                             f"{type(module).__name__}")
        if not is_linear_like(module):
            if not isinstance(module, nn.Conv2d):
                raise InputError(f"target {name} is a {type(module).__name__}; only Linear/Conv1D/Conv2d are supported")
            continue
        d_in, d_out = in_out_features(module)
        k = min(d_in, d_out)
        if spec.dash_phase and config.dash_directions > k:
            raise InputError(f"dash_directions={config.dash_directions} is larger than min(out, in) = min({d_out}, "
                             f"{d_in}) = {k} of target layer {name}")
        if spec.rank_from_weight and config.r > k:
            raise InputError(f"r={config.r} is larger than min(out, in) = {k} of target layer {name}")


def _check_svd_cache_dir(config: AdapterConfig) -> None:
    """``dash_svd_cache_dir`` must be a writable directory (created when missing)."""
    if not (config.uses_dash and config.dash_svd_cache_dir):
        return
    path = Path(config.dash_svd_cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"dash_svd_cache_dir {path} cannot be created as a directory: {err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"dash_svd_cache_dir {path} is not writable")


def _take_batches(data: Iterable[Any] | None, config: AdapterConfig) -> list[Any]:
    """The batches a data-driven init reads (its registry ``data_budget``), read once; they are cycled when fewer."""
    if data is None:
        raise InputError(f"method {config.method!r} needs data=... (an iterable of batches) to initialise")
    budget, unit = config.spec.data_budget(config)
    if unit == "samples":
        out, samples = [], 0
        for batch in data:
            out.append(batch)
            samples += batch_size_of(batch)
            if samples >= budget:
                break
    else:
        out = list(itertools.islice(data, budget))
    if not out:
        raise InputError(f"data is empty: method {config.method!r} needs at least one batch to initialise")
    return out
