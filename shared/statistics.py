"""One statistics engine for every data-driven init (EVA, LoRA-DA, the gradient estimator of LoRA-Init).

It runs the user's ``forward_fn(model, batch) -> loss`` over a capped number of batches with hooks on
the target layers, and hands each layer's masked inputs x (T × in) and, when asked, the gradients of
the loss w.r.t. the layer outputs g (T × out) to streaming accumulators. The weight gradient is
never materialised by autograd: ∂L/∂W = Σ_t g_t x_tᵀ comes from those two (``inits.md`` §5.1).

To get output gradients with every parameter frozen, a forward pre-hook makes a target layer's input
a leaf that requires grad when nothing upstream does; everything downstream then carries a graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

ForwardFn = Callable[[nn.Module, Any], torch.Tensor]
MaskFn = Callable[[Any], "torch.Tensor | None"]


class Accumulator(Protocol):
    """Streaming per-layer statistic."""

    needs_grad: bool

    def update(self, x: torch.Tensor, g: torch.Tensor | None, batch_size: int) -> None:
        """x: masked fp32 inputs (T × in); g: masked fp32 output gradients (T × out) or None."""


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) mapping/list/tuple batch to ``device`` (mappings come back as dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def default_forward_fn(model: nn.Module, batch: Any) -> Any:
    """``model(**batch).loss``, the transformers convention; the raw output when it has no loss.

    Forward-only statistics (EVA) need no loss, so batches without labels work there.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"the default forward_fn needs mapping batches (model(**batch)); got {type(batch).__name__}. "
            "Pass forward_fn=(model, batch) -> loss for other batch types"
        )
    out = model(**move_to(batch, model_device(model)))
    loss = getattr(out, "loss", None)
    return out if loss is None else loss


def require_loss(loss: Any) -> torch.Tensor:
    """The loss a gradient-based init backpropagates, or an error saying how to provide one."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(
            "forward_fn returned no scalar loss (with the default, model(**batch) needs 'labels' in the batch); "
            "pass forward_fn=(model, batch) -> loss"
        )
    if not loss.requires_grad:
        raise RuntimeError("forward_fn returned a loss without a graph; it must depend on the model")
    return loss


def token_mask(batch: Any, use_label_mask: bool = True, ignore_index: int = -100) -> torch.Tensor | None:
    """Tokens that count: ``attention_mask`` and, if asked, ``labels != ignore_index`` (``inits.md`` §1.1 step 1)."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    mask = mask.bool() if isinstance(mask, torch.Tensor) else None
    labels = batch.get("labels")
    if use_label_mask and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        lab = labels != ignore_index
        mask = lab if mask is None or mask.shape != lab.shape else mask & lab
    return mask


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    for v in values:
        if isinstance(v, (torch.Tensor, Mapping, list, tuple)):
            return batch_size_of(v)
    return 1


def _select(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and t.dim() >= 2 and tuple(t.shape[:-1]) == tuple(mask.shape):
        t = t[mask.to(t.device)]
    return t.reshape(-1, t.shape[-1]).to(torch.float32)


@contextlib.contextmanager
def _frozen_eval(model: nn.Module):
    """Freeze every parameter and switch to eval mode; restore both afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def collect(
    model: nn.Module,
    layers: dict[str, nn.Module],
    accumulators: dict[str, Accumulator],
    batches: Iterable[Any],
    forward_fn: ForwardFn = default_forward_fn,
    *,
    mask_fn: MaskFn = token_mask,
    max_batches: int | None = None,
    until: Callable[[], bool] | None = None,
    desc: str = "statistics",
    progress: bool = True,
) -> int:
    """Stream masked layer inputs (and output gradients) of ``layers`` into ``accumulators``.

    Several names may share one accumulator (layers with identical inputs); it is then updated once per
    batch, from the first of them. Stops after ``max_batches`` batches, when ``until()`` turns true, or
    when ``batches`` ends. Returns the number of batches used; raises if that is zero.
    """
    from tqdm.auto import tqdm

    needs_grad = any(a.needs_grad for a in accumulators.values())
    seen: dict[str, list[torch.Tensor]] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    state: dict[str, Any] = {"mask": None}
    handles = []

    def pre_hook(module, args):
        if needs_grad and args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True),) + tuple(args[1:])
        return None

    def make_hook(name: str):
        def hook(module, args, output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            mask = state["mask"]
            seen.setdefault(name, []).append(_select(x.detach(), mask))
            if needs_grad and isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(lambda g: grads.setdefault(name, []).append(_select(g.detach(), mask)))

        return hook

    owners: dict[int, str] = {}
    for name in layers:
        owners.setdefault(id(accumulators[name]), name)
    for name, module in layers.items():
        if owners[id(accumulators[name])] != name:
            continue  # another layer feeds this shared accumulator
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(make_hook(name)))

    used = 0
    bar = tqdm(total=max_batches, desc=desc, disable=not progress, leave=False)
    try:
        with _frozen_eval(model), torch.set_grad_enabled(needs_grad):
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                seen.clear()
                grads.clear()
                state["mask"] = mask_fn(batch)
                loss = forward_fn(model, batch)
                if needs_grad:
                    require_loss(loss).backward()
                n = batch_size_of(batch)
                for name, acc in ((owners[k], accumulators[owners[k]]) for k in owners):
                    if name not in seen:
                        raise RuntimeError(f"target layer {name} was not called by forward_fn; check target_modules")
                    x = torch.cat(seen[name])
                    g = None
                    if acc.needs_grad:
                        if name not in grads:
                            raise RuntimeError(f"the loss does not depend on target layer {name}; no gradient reached it")
                        # backward visits calls in reverse order
                        g = torch.cat(grads[name][::-1])
                    acc.update(x, g, n)
                used += 1
                bar.update(1)
                if until is not None and until():
                    break
    finally:
        for h in handles:
            h.remove()
        bar.close()
    if used == 0:
        raise ValueError("data is empty: the data-driven init needs at least one batch")
    return used


def shared_input_groups(model: nn.Module, layers: dict[str, nn.Module], batch: Any,
                        forward_fn: ForwardFn = default_forward_fn) -> list[list[str]]:
    """Groups of layers that receive the identical input tensor in a row (q/k/v, gate/up), from one forward pass.

    A layer joins the group of the layer hooked just before it when its input is that very tensor. The previous
    input is held until the next hook runs, so its memory cannot be freed and reused by a different tensor of the
    same shape (which a bare ``data_ptr`` comparison would take for the same input). Layers sharing an input but
    not called in a row get groups of their own: slower, never wrong.
    """
    group_of: dict[str, int] = {}
    previous: list[Any] = [None, -1]  # the last hooked input (kept alive) and its group

    def same(x: Any, y: Any) -> bool:
        return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.data_ptr() == y.data_ptr()
                and x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype)

    def make_hook(name: str):
        def hook(module, args, output) -> None:
            if name in group_of:
                return
            x = args[0] if args else None
            group_of[name] = previous[1] if same(x, previous[0]) else len(group_of)
            previous[:] = [x, group_of[name]]

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in layers.items()]
    try:
        with _frozen_eval(model), torch.no_grad():
            forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
        previous[:] = [None, -1]
    groups: dict[Any, list[str]] = {}
    for name in layers:
        groups.setdefault(group_of.get(name, name), []).append(name)
    return list(groups.values())


class InputSecondMoment:
    """Z = (1/T) Σ_t x_t x_tᵀ, uncentered (LoRA-DA's K-FAC input factor, ``inits.md`` §2.2 step 2)."""

    needs_grad = False

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor, g: torch.Tensor | None, batch_size: int) -> None:
        xtx = x.T @ x
        self.sum = xtx if self.sum is None else self.sum + xtx
        self.count += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


class WeightGradient:
    """Mean over batches of ∂L/∂W = Σ_t g_t x_tᵀ (out × in); the LoRA-Init gradient estimator."""

    needs_grad = True

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.batches = 0

    def update(self, x: torch.Tensor, g: torch.Tensor | None, batch_size: int) -> None:
        gw = g.T @ x
        self.total = gw if self.total is None else self.total + gw
        self.batches += 1

    @property
    def value(self) -> torch.Tensor:
        return self.total / max(self.batches, 1)


class FisherGradient:
    """Mean weight gradient G = ∂L/∂W, K-FAC factors Z and diag(Y) (``inits.md`` §2.2 steps 1-3).

    Output gradients are rescaled by the batch size, so y estimates the per-sample empirical Fisher for
    a batch-mean loss (the reference runs batch size 1).
    """

    needs_grad = True

    def __init__(self) -> None:
        self.g = WeightGradient()
        self.z = InputSecondMoment()
        self.y_sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor, g: torch.Tensor | None, batch_size: int) -> None:
        self.g.update(x, g, batch_size)
        self.z.update(x, None, batch_size)
        gs = (g * batch_size).pow(2).sum(0)
        self.y_sum = gs if self.y_sum is None else self.y_sum + gs

    @property
    def grad(self) -> torch.Tensor:
        return self.g.value

    @property
    def y(self) -> torch.Tensor:
        return self.y_sum / max(self.z.count, 1)
