"""Task-specific directions (TSD): the math of Si et al., arXiv 2409.01035, and its diagnostics.

Notation (``docs/methods.md#lora-dash``): a frozen weight W ∈ R^{n×m} (out × in) with thin SVD W = U Σ Vᵀ,
k = min(n, m). For an update ΔW the coordinates along the core directions u_i v_iᵀ are

    Δσ_i = u_iᵀ ΔW v_i                      (Sec. 3, "change of the core bases")
    δ_i  = |Δσ_i| / (σ_i + eps)             (Eq. of the change rate; eps added, the reference has none)

and the task-specific directions are I = top-s(δ) over the numerically non-null directions,
σ_i > max(n, m)·ε·σ_1 with ε the machine epsilon of the fp32 SVD (the rank tolerance of LAPACK and
``numpy.linalg.matrix_rank``). Below that floor σ_i is rounding noise: δ_i would be ~|Δσ_i|/1e-7 and win
every top-s, although such a direction's basis is arbitrary (fp32 and fp64 pick different ones). LoRA-Dash replaces the
unknown ΔW* = W* - W by the
LoRA update after t steps. The update is always given in factored form ΔW = P Q (P: n×q, Q: q×m), so
Δσ = rowsum((UᵀP) ⊙ (Q V)ᵀ) costs O(k q (n + m)) and ΔW is never formed (``docs/methods.md#lora-dash``).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .io import atomic_write_bytes, atomic_write_text

Tensor = torch.Tensor

#: bytes of fp32 weights stacked into one batched SVD call
SVD_BATCH_BYTES = 256 * 2**20


def iter_svd(names: Sequence[str], weight_of: Callable[[str], Tensor], shape_of: Callable[[str], tuple],
             max_bytes: int = SVD_BATCH_BYTES) -> Iterator[tuple[str, Tensor, Tensor, Tensor]]:
    """Yield ``(name, U, S, Vh)``: thin fp32 SVDs of many weights, stacked by equal shape into batched calls.

    Weights are materialised chunk by chunk (:func:`svd_chunks`, at most ``max_bytes`` of fp32 per call), so a whole
    model never sits in memory twice; :func:`stack_weights` copies each into the chunk's stack as soon as it is read,
    so besides the stack at most one weight that ``weight_of`` made (a dequantised layer of a quantised base) is
    alive at a time. Names are stacked in sorted order, so a reload passing the layers in another order makes the
    same batched calls as the switch did. Signs are canonical (:func:`canonical_signs`): every process and every
    reload that sees the same W gets the same singular vectors.
    """
    for chunk in svd_chunks(names, shape_of, max_bytes):
        U, S, Vh = batched_svd(stack_weights(chunk, weight_of))
        for j, name in enumerate(chunk):
            yield name, U[j], S[j], Vh[j]


def svd_chunks(names: Sequence[str], shape_of: Callable[[str], tuple],
               max_bytes: int = SVD_BATCH_BYTES) -> list[list[str]]:
    """The batched SVD calls of :func:`iter_svd`: the sorted names grouped by shape, each group cut into runs of at
    most ``max_bytes`` of fp32 weights (at least one weight per call)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in sorted(names):
        groups[tuple(shape_of(name))].append(name)
    chunks = []
    for shape, members in groups.items():
        per = max(1, max_bytes // (4 * shape[0] * shape[1]))
        chunks += [members[start : start + per] for start in range(0, len(members), per)]
    return chunks


def stack_weights(chunk: Sequence[str], weight_of: Callable[[str], Tensor]) -> Tensor:
    """The fp32 stack (b × n × m) of the chunk's weights, each copied in as soon as ``weight_of`` made it and dropped
    right after, so at most one made weight (a dequantised layer) is alive besides the stack."""
    stack = None
    for j, name in enumerate(chunk):
        w = weight_of(name).detach()
        if stack is None:
            stack = torch.empty((len(chunk), *w.shape), dtype=torch.float32, device=w.device)
        stack[j] = w
        del w
    return stack


def batched_svd(stack: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a stack of fp32 matrices (b × n × m), canonical signs: U (b × n × k), S (b × k), Vh (b × k × m)."""
    U, S, Vh = torch.linalg.svd(stack, full_matrices=False)
    U, Vh = canonical_signs(U, Vh)
    return U, S, Vh


def canonical_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each pair (u_i, v_i) so that the largest-magnitude entry of v_i is positive.

    The joint flip (u_i, v_i) -> (-u_i, -v_i) changes no function of the core: u_i v_iᵀ, the dash term
    Σ λ_i u_i v_iᵀ and LoRA-Init's γBA are invariant, and training from either sign follows the mirrored
    trajectory. The flip is fixed only so that the stored tensors (U_I, V_Iᵀ, LoRA-Init's A and B) are
    bitwise the same on every process and every run that sees the same W.
    """
    pivot = Vh.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(Vh, -1, pivot))
    sign[sign == 0] = 1
    return U * sign.transpose(-1, -2), Vh * sign


def delta_sigma(U: Tensor, Vh: Tensor, P: Tensor, Q: Tensor) -> Tensor:
    """Δσ_i = u_iᵀ (P Q) v_i for all i, without forming P Q.

    Args:
        U: n×k left singular vectors of W. Vh: k×m right singular vectors (rows).
        P: n×q, Q: q×m factors of the update ΔW = P Q.
    """
    return ((U.transpose(0, 1) @ P) * (Q @ Vh.transpose(0, 1)).transpose(0, 1)).sum(dim=1)


def change_rate(sigma: Tensor, dsigma: Tensor, eps: float = 1e-8) -> Tensor:
    """δ_i = |Δσ_i| / (σ_i + eps) (``docs/methods.md#lora-dash``; eps guards rank-deficient W)."""
    return dsigma.abs() / (sigma.abs() + eps)


def non_null(S: Tensor, shape: Sequence[int]) -> Tensor:
    """Mask of the numerically non-null singular directions: σ_i > max(n, m)·ε·σ_1, ε the fp32 machine epsilon.

    ε is that of the core's SVDs (fp32) whatever ``S``'s dtype, so an fp64 SVD of the same weight keeps the same
    directions. All False for W = 0; the floor is relative, so it means the same for a weight of any scale.
    """
    floor = max(shape[-2:]) * torch.finfo(torch.float32).eps * S.max().clamp_min(0)
    return (S > floor) & (S > 0)


def select_directions(rate: Tensor, s: int, valid: Tensor | None = None) -> Tensor:
    """Indices of the s largest change rates among ``valid`` (default: all), sorted by decreasing rate.

    Returns fewer than s indices when fewer directions are valid. Ties keep the lower index first.
    """
    if s > rate.numel():
        raise ValueError(f"cannot select {s} directions from a weight with only {rate.numel()} singular values")
    # stable sort keeps the result identical on every rank and every run, even with ties
    order = torch.sort(rate, descending=True, stable=True).indices
    if valid is not None:
        order = order[valid[order]]
    return order[:s]


def energy_share(U_I: Tensor, Vh_I: Tensor, P: Tensor, Q: Tensor) -> float:
    """‖U_Iᵀ ΔW V_I‖_F² / ‖ΔW‖_F² with ΔW = P Q: the share of the update on the TSD subspace (§5)."""
    inner = (U_I.transpose(0, 1) @ P) @ (Q @ Vh_I.transpose(0, 1))
    total = ((P.transpose(0, 1) @ P) * (Q @ Q.transpose(0, 1))).sum()
    return float(inner.pow(2).sum() / total) if total > 0 else 0.0


@dataclass
class LayerReport:
    """Diagnostics of one adapted layer (``docs/methods.md#lora-dash``)."""

    name: str
    sigma: Tensor
    delta_sigma: Tensor
    change_rate: Tensor
    indices: Tensor
    energy_share: float
    core_energy_share: float

    @property
    def rank_positions(self) -> list[int]:
        """1-based positions of the selected directions in the descending σ order."""
        return [int(i) + 1 for i in self.indices]

    @property
    def top_s_mass(self) -> float:
        """Concentration of δ: share of Σδ carried by the selected s directions."""
        total = float(self.change_rate.sum())
        return float(self.change_rate[self.indices].sum()) / total if total > 0 else 0.0

    def as_row(self) -> dict[str, Any]:
        k = self.sigma.numel()
        return {
            "layer": self.name,
            "k": k,
            "selected": " ".join(str(int(i)) for i in self.indices),
            "rank_positions": " ".join(str(p) for p in self.rank_positions),
            "median_relative_position": float(torch.tensor(self.rank_positions, dtype=torch.float32).median()) / k,
            "max_change_rate": float(self.change_rate.max()),
            "top_s_mass": self.top_s_mass,
            "energy_share_selected": self.energy_share,
            "energy_share_core": self.core_energy_share,
        }


def report(adapter: Any) -> list[LayerReport]:
    """Per-layer TSD diagnostics of an :class:`shared.Adapter`.

    After the dash switch the rows are the ones recorded at the switch (the directions actually used);
    before it, and for methods without dash, they are computed from the current update against the
    original base weight with s = ``config.dash_directions``.
    """
    return adapter.tsd_report()


def report_rows(reports: Iterable[LayerReport]) -> list[dict[str, Any]]:
    return [r.as_row() for r in reports]


def write_report_csv(reports: Sequence[LayerReport], path: str) -> None:
    """Write :func:`report` rows as CSV (atomic)."""
    rows = report_rows(reports)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def plot_change_rates(reports: Sequence[LayerReport], path: str, max_layers: int = 12) -> None:
    """Plot δ_i against the σ order per layer, selected directions marked (like the paper's figure).

    matplotlib is imported here, so the core does not need it at import time.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(reports)[:max_layers]
    if not shown:
        raise ValueError("no layers to plot")
    cols = min(3, len(shown))
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, rep in zip(axes.flat, shown, strict=False):  # the last row may have spare axes
        x = torch.arange(1, rep.sigma.numel() + 1)
        ax.plot(x, rep.change_rate.cpu(), lw=0.8, color="tab:blue", label="change rate δ")
        ax.scatter(
            (rep.indices + 1).cpu(), rep.change_rate[rep.indices].cpu(), color="tab:red", s=12, zorder=3,
            label="selected",
        )
        ax.set_title(rep.name if len(rep.name) <= 44 else "…" + rep.name[-43:], fontsize=8)
        ax.set_xlabel("singular direction (σ descending)", fontsize=7)
        ax.set_yscale("log")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
