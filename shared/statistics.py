"""One statistics engine for every data-driven init (EVA, LoRA-DA, the gradient estimator of LoRA-Init).

It runs the user's ``forward_fn(model, batch) -> loss`` over a capped number of batches with hooks on
the target layers, and hands each layer's masked inputs x (T × in) and, when asked, the gradients of
the loss w.r.t. the layer outputs g (T × out) to streaming accumulators. The weight gradient is
never materialised by autograd: ∂L/∂W = Σ_t g_t x_tᵀ comes from those two (``docs/methods.md#method-notes``).

Which positions t count. The gradient statistics sum over every attended position (``attention_mask``):
with prompt-masked SFT labels the prompt positions still carry gradient through attention, and the loss at
position t reads the label at t+1, so any label mask there gives something other than ∂L/∂W. A label mask is
an explicit opt-in (``AdapterConfig.grad_label_mask``) and then uses the next-token shift. EVA's input statistics
follow peft (``eva_use_label_mask``: ``labels != -100`` at the same position).

To get output gradients with every parameter frozen, a forward pre-hook makes a target layer's input
a leaf that requires grad when nothing upstream does; everything downstream then carries a graph.
Gradient checkpointing is supported: forwards that run inside the engine's own backward are recomputations,
which add no rows (with reentrant checkpointing, whose first forward has no graph, the recomputation supplies
the rows and their gradients instead).

A quantised layer (bitsandbytes 4/8-bit) has no gradient buffer on its W, but its inputs and output gradients are
there as for any layer, so Σ_t g_t x_tᵀ is the gradient with respect to the dequantised weight it computes with.

Under DDP (``docs/distributed.md#pooled-init-statistics``) each process reads its own batches and the accumulators
pool them at the end of :func:`collect` (:meth:`Accumulator.pool`: sums all-reduced), so N processes read N× the
batches, and the statistics equal one process reading all of them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from .distributed import all_reduce_sum

ForwardFn = Callable[[nn.Module, Any], torch.Tensor]
MaskFn = Callable[[Any], "torch.Tensor | None"]


class Accumulator(Protocol):
    """Streaming per-layer statistic."""

    needs_grad: bool

    def update(self, x: torch.Tensor, g: torch.Tensor | None, batch_size: int) -> None:
        """x: masked fp32 inputs (T × in); g: masked fp32 output gradients (T × out) or None."""

    def pool(self) -> None:
        """Combine the statistics of every process (a collective; a no-op with one process)."""


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


def token_mask(batch: Any, use_label_mask: bool = True, ignore_index: int = -100, *,
               shift: bool = False) -> torch.Tensor | None:
    """Positions that count: ``attention_mask`` and, if asked, a label mask.

    The label mask is ``labels[t] != ignore_index`` (peft's EVA, ``docs/methods.md#eva``) or, with ``shift``,
    ``labels[t + 1] != ignore_index``: the positions whose outputs the next-token loss reads.
    """
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    mask = mask.bool() if isinstance(mask, torch.Tensor) else None
    labels = batch.get("labels")
    if use_label_mask and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        lab = labels != ignore_index
        if shift:
            lab = torch.cat([lab[:, 1:], torch.zeros_like(lab[:, :1])], 1)
        mask = lab if mask is None or mask.shape != lab.shape else mask & lab
    return mask


def attention_mask(batch: Any) -> torch.Tensor | None:
    """Every attended position (``attention_mask``; None: all)."""
    return token_mask(batch, use_label_mask=False)


def gradient_mask(config: Any) -> MaskFn:
    """The positions of the gradient statistics (LoRA-DA, LoRA-Init's gradient estimator): every attended one, which
    gives the exact ∂L/∂W; with ``config.grad_label_mask`` only those whose next token is a label (an approximation
    some references use, opt-in)."""
    if config.grad_label_mask:
        return lambda batch: token_mask(batch, True, shift=True)
    return attention_mask


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    for v in values:
        if isinstance(v, (torch.Tensor, Mapping, list, tuple)):
            return batch_size_of(v)
    return 1


def masked_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``t`` (… × d) at the positions ``mask`` keeps (when its shape is ``t``'s leading dims), as an
    fp32 matrix N × d: what the accumulators see of a layer's inputs or output gradients."""
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
    mask_fn: MaskFn = attention_mask,
    max_batches: int | None = None,
    until: Callable[[], bool] | None = None,
    desc: str = "statistics",
    progress: bool = True,
) -> int:
    """Stream masked layer inputs (and output gradients) of ``layers`` into ``accumulators``.

    Several names may share one accumulator (layers with identical inputs); it is then updated once per
    batch, from the first of them. Stops after ``max_batches`` batches, when ``until()`` turns true, or
    when ``batches`` ends. Returns the number of batches used; raises if that is zero.

    Each call of a hooked layer is one row block [x, g]: g is the gradient of its output, zero for a call the
    loss does not depend on. Calls during the backward (gradient checkpointing's recomputation) add no block,
    except to stand in for a forward call that had no graph (reentrant checkpointing runs the first forward
    without one). At the end every accumulator is pooled across processes (:meth:`Accumulator.pool`), so every
    rank must call ``collect`` with the same layers.
    """
    from tqdm.auto import tqdm

    needs_grad = any(a.needs_grad for a in accumulators.values())
    blocks: dict[str, list[list[Any]]] = {}  # per layer: [x, g or None, had a graph] per call
    missing: dict[str, int] = {}  # per layer: forward calls without a graph, to be recomputed in the backward
    state: dict[str, Any] = {"mask": None, "backward": False}
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
            if state["backward"]:  # a checkpoint recomputation
                if not missing.get(name):
                    return
                missing[name] -= 1
            graph = needs_grad and isinstance(output, torch.Tensor) and output.requires_grad
            block = [masked_rows(x.detach(), state["mask"]), None, graph]
            blocks.setdefault(name, []).append(block)
            if graph:
                mask = state["mask"]
                output.register_hook(lambda g: block.__setitem__(1, masked_rows(g.detach(), mask)))
            elif needs_grad:
                missing[name] = missing.get(name, 0) + 1

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
                blocks.clear()
                missing.clear()
                state["mask"] = mask_fn(batch)
                loss = forward_fn(model, batch)
                if needs_grad:
                    state["backward"] = True
                    try:
                        require_loss(loss).backward()
                    finally:
                        state["backward"] = False
                n = batch_size_of(batch)
                for name, acc in ((owners[k], accumulators[owners[k]]) for k in owners):
                    x, g = _rows(name, blocks.get(name), acc.needs_grad)
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
    for key in owners:
        accumulators[owners[key]].pool()
    return used


def weight_gradients(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Any],
                     forward_fn: ForwardFn = default_forward_fn, *, max_batches: int, mask_fn: MaskFn = attention_mask,
                     desc: str = "gradients", progress: bool = True) -> dict[str, torch.Tensor]:
    """Per layer the mean over ``max_batches`` batches (cycled when fewer) of ∂L/∂W = Σ_t g_t x_tᵀ (out × in, fp32),
    pooled across processes (:class:`WeightGradient`)."""
    accs = {name: WeightGradient() for name in layers}
    collect(model, layers, accs, itertools.cycle(batches), forward_fn, mask_fn=mask_fn, max_batches=max_batches,
            desc=desc, progress=progress)
    return {name: acc.value for name, acc in accs.items()}


def _rows(name: str, blocks: list[list[Any]] | None, needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, g) of one layer for one batch from its call blocks; g is None unless ``needs_grad``."""
    if not blocks:
        raise RuntimeError(f"target layer {name} was not called by forward_fn; check target_modules")
    if not needs_grad:
        return torch.cat([b[0] for b in blocks]), None
    blocks = [b for b in blocks if b[2]]  # calls without a graph were replaced by their recomputation
    if not any(b[1] is not None for b in blocks):
        raise RuntimeError(f"the loss does not depend on target layer {name}; no gradient reached it")
    x = torch.cat([b[0] for b in blocks])
    g = torch.cat([b[1] if b[1] is not None else b[0].new_zeros(b[0].shape[0], _out_width(blocks)) for b in blocks])
    return x, g


def _out_width(blocks: list[list[Any]]) -> int:
    return next(b[1].shape[-1] for b in blocks if b[1] is not None)


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
    """Z = (1/T) Σ_t x_t x_tᵀ, uncentered (LoRA-DA's K-FAC input factor, ``docs/methods.md#lora-da``)."""

    needs_grad = False

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor, g: torch.Tensor | None, batch_size: int) -> None:
        xtx = x.T @ x
        self.sum = xtx if self.sum is None else self.sum + xtx
        self.count += x.shape[0]

    def pool(self) -> None:
        self.sum, count = all_reduce_sum([self.sum, torch.tensor(float(self.count), dtype=torch.float64)])
        self.count = int(count)

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

    def pool(self) -> None:
        self.total, batches = all_reduce_sum([self.total, torch.tensor(float(self.batches), dtype=torch.float64)])
        self.batches = int(batches)

    @property
    def value(self) -> torch.Tensor:
        return self.total / max(self.batches, 1)


class FisherGradient:
    """Mean weight gradient G = ∂L/∂W, K-FAC factors Z and diag(Y) (``docs/methods.md#lora-da``).

    Output gradients are rescaled by the batch size, so y estimates the per-sample empirical Fisher for
    a batch-mean loss (the reference runs batch size 1). Layers with identical inputs (q/k/v, gate/up) share
    one Z: pass the group's first accumulator's ``z`` to the others, which then leave it to that one.
    """

    needs_grad = True

    def __init__(self, z: InputSecondMoment | None = None) -> None:
        self.g = WeightGradient()
        self.owns_z = z is None
        self.z = InputSecondMoment() if z is None else z
        self.y_sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor, g: torch.Tensor | None, batch_size: int) -> None:
        self.g.update(x, g, batch_size)
        if self.owns_z:
            self.z.update(x, None, batch_size)
        gs = (g * batch_size).pow(2).sum(0)
        self.y_sum = gs if self.y_sum is None else self.y_sum + gs

    def pool(self) -> None:
        """G, diag(Y) and (if this one owns it) Z summed over the processes."""
        self.g.pool()
        if self.owns_z:
            self.z.pool()
        (self.y_sum,) = all_reduce_sum([self.y_sum])

    @property
    def grad(self) -> torch.Tensor:
        return self.g.value

    @property
    def y(self) -> torch.Tensor:
        return self.y_sum / max(self.z.count, 1)
