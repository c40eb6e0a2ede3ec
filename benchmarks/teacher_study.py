"""Controlled teacher study on the mini SDXL UNet (issue 6, item 3): does dash find known task directions?

The "task" is known exactly: a teacher UNet is the pretrained mini SDXL UNet plus a change along chosen
singular directions of each adapted weight (the trainer's attention targets),

    W_T = W + Σ_{i ∈ I*} c · sign_i · σ_i u_i v_iᵀ,

with ``teacher_directions`` = |I*| indices drawn per layer from a band of the σ order (:data:`BANDS`; "moderate",
ranks k/4 to 3k/4, is where the paper places TSDs) and a change rate δ_i = c on I*, 0 elsewhere: I* is, by construction,
the task-specific direction set of ΔW* = W_T - W (Si et al., arXiv 2409.01035, Sec. 3). Each method trains the
student (the base UNet with its adapter, rank ``rank``) to match the teacher's noise prediction,
L = ‖ε_student(x_t, t, c) - ε_teacher(x_t, t, c)‖², on noisy VAE latents of ``train_images`` images of the shipped
replay prior (the base's own generations of the ten classes) with their class prompts (uniform DDPM timesteps), AdamW at
a constant lr, the same data order for every method.
``teacher_band`` "top" (the largest σ, the directions the data excites most) is the positive control.

Reported per method (mean ± std over seeds; a seed draws the teacher's directions and signs, the data order and
the init):

- ``relative error``: held-out MSE(ε_student, ε_teacher) / MSE(ε_base, ε_teacher) on 256 fixed (image, noise,
  t) triples of the shipped reference images, never trained on (1 = nothing learned, 0 = the teacher matched);
- ``teacher recall at switch`` (dash, tsd): |I ∩ I*| / |I*| of the directions the dash switch selected;
- ``teacher recall of the final update``: the same for the top-s change rates δ of each method's final update,
  and for the top-s |Δσ| (no division by σ);
- ``recovered change``: mean over I* of Δσ_i(learned) / Δσ_i(teacher) (1 = the teacher's change recovered
  along its own directions);
- ``update energy on I*``: ‖U_I*ᵀ ΔW V_I*‖_F² / ‖ΔW‖_F² of the learned update;
- ``dash share`` (dash, tsd): Σ|λ_i| / (Σ|λ_i| + Σ|Δσ_i of the LoRA part|) on the selected directions I: how much of
  the change along I the dash coefficients carry (the "amplification" the method is named for).
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TITLE = "Teacher study: recovering known directions on the mini SDXL UNet"
HELD_OUT = 256
DATA = "base-samples-v1"  # the inputs: the mini SDXL's shipped generations (see :class:`Data`)


def cells(methods: list[str], seeds: list[int], **settings: Any) -> list[dict[str, Any]]:
    return [{"kind": "teacher", "data": DATA, "method": m, "seed": s, **settings} for s in seeds for m in methods]


#: where the teacher's directions are drawn in the descending σ order, as fractions of k
BANDS = {"moderate": (0.25, 0.75), "top": (0.0, 0.125), "bottom": (0.875, 1.0)}


def teacher_change(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, n: int, rate: float,
                   generator: torch.Generator, band: str = "moderate") -> tuple[torch.Tensor, torch.Tensor]:
    """(indices I*, ΔW*) with ΔW* = Σ_{i∈I*} rate · sign_i · σ_i u_i v_iᵀ, I* drawn from the σ ranks of ``band``
    (at least n of them)."""
    k = S.numel()
    lo = min(int(BANDS[band][0] * k), k - n)
    hi = max(int(BANDS[band][1] * k), lo + n)
    idx = torch.sort(lo + torch.randperm(hi - lo, generator=generator)[:n]).values
    sign = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    return idx, (U[:, idx] * (rate * sign * S[idx])) @ Vh[idx]


class Data:
    """Latent posteriors and text conditioning of the shipped replay prior (training) and reference images
    (evaluation): both are generations of the mini SDXL, drawn with disjoint seeds."""

    def __init__(self, parts: Any, seed: int, train_images: int) -> None:
        from tsd_diffusion.mini_sdxl import (
            CLASSES,
            REPLAY_PRIOR_FILE,
            TIME_IDS,
            WEIGHTS_DIR,
            load_class_set,
            reference_images,
            to_tensor,
        )

        x_train, y_train, _ = load_class_set(WEIGHTS_DIR / REPLAY_PRIOR_FILE)
        if train_images > len(x_train):
            raise ValueError(f"train_images={train_images}, but the replay prior holds {len(x_train)} images")
        x_held, y_held = reference_images()
        pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))[:train_images]
        with torch.no_grad():
            cond = {c: parts.encode_prompt([f"a photo of a {c}"]) for c in CLASSES}
            self.train = self._encode(parts, to_tensor(x_train[pick].numpy()), y_train[pick], cond)
            self.held = self._encode(parts, x_held[:HELD_OUT], y_held[:HELD_OUT], cond)
        self.time_ids = torch.tensor(TIME_IDS, dtype=torch.float32)
        self.parts = parts
        g = torch.Generator().manual_seed(10_000 + seed)  # the held-out noise and timesteps, fixed per seed
        self.held_batch = self.batch(torch.arange(HELD_OUT), g, split="held")

    @staticmethod
    def _encode(parts: Any, pixels: torch.Tensor, labels: Any, cond: dict) -> dict[str, torch.Tensor]:
        from tsd_diffusion.mini_sdxl import CLASSES

        params = torch.cat([parts.latent_params(pixels[i:i + 256]) for i in range(0, len(pixels), 256)])
        embeds = torch.cat([cond[CLASSES[int(c)]][0] for c in labels])
        pooled = torch.cat([cond[CLASSES[int(c)]][1] for c in labels])
        return {"params": params, "embeds": embeds, "pooled": pooled}

    def batch(self, idx: torch.Tensor, generator: torch.Generator, split: str = "train") -> dict[str, torch.Tensor]:
        """Noisy latents at uniform timesteps with the conditioning of the images ``idx``."""
        src = getattr(self, split)
        params = src["params"][idx]
        sched = self.parts.scheduler
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
            latents = self.parts.sample_latents(params)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=generator)
        return {"sample": sched.add_noise(latents, noise, t), "timestep": t,
                "encoder_hidden_states": src["embeds"][idx],
                "added_cond_kwargs": {"text_embeds": src["pooled"][idx],
                                      "time_ids": self.time_ids.expand(len(idx), -1)}}


def predict(unet: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return unet(**{k: v for k, v in batch.items() if k != "target"}, return_dict=False)[0]


def run_cell(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    import shared
    from shared import tsd
    from shared.layers import find_targets
    from tsd_diffusion.mini_sdxl import MINI_NAME
    from tsd_diffusion.models import UNET_TARGETS, SDXLParts
    from tsd_diffusion.tiny import resolve_pretrained

    torch.manual_seed(cfg["seed"])
    parts = SDXLParts(resolve_pretrained(MINI_NAME))
    data = Data(parts, cfg["seed"], cfg["train_images"])
    base = parts.unet.eval()
    teacher = copy.deepcopy(base)
    targets = find_targets(base, UNET_TARGETS)
    names = sorted(targets)
    svd = {n: (U, S, Vh) for n, U, S, Vh in tsd.iter_svd(names, lambda n: targets[n].weight,
                                                         lambda n: targets[n].weight.shape)}
    g = torch.Generator().manual_seed(cfg["seed"])
    truth: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    teacher_modules = dict(teacher.named_modules())
    for n in names:
        idx, dW = teacher_change(*svd[n], cfg["teacher_directions"], cfg["teacher_rate"], g,
                                 cfg["teacher_band"])
        teacher_modules[n].weight.data += dW
        truth[n] = (idx, tsd.delta_sigma(svd[n][0], svd[n][2], dW, torch.eye(dW.shape[1]))[idx])

    def with_target(batch: dict[str, Any]) -> dict[str, Any]:
        with torch.no_grad():
            return {**batch, "target": predict(teacher, batch)}

    held = with_target(data.held_batch)
    with torch.no_grad():
        base_error = float(F.mse_loss(predict(base, held), held["target"]))

    order = torch.Generator().manual_seed(cfg["seed"])

    def next_batch() -> dict[str, Any]:
        return with_target(data.batch(torch.randint(0, cfg["train_images"], (cfg["batch_size"],), generator=order),
                                      order))

    def loss_fn(unet: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return F.mse_loss(predict(unet, batch), batch["target"])

    config = shared.AdapterConfig(method=cfg["method"], r=cfg["rank"], alpha=cfg["rank"], target_modules=UNET_TARGETS,
                                  dash_warmup_steps=cfg["dash_warmup_steps"], dash_directions=cfg["directions"],
                                  seed=cfg["seed"], eva_max_batches=8, lora_init_steps=8, lora_ga_batches=8,
                                  lora_da_num_samples=8 * cfg["batch_size"])
    stats = [next_batch() for _ in range(8)] if config.needs_data else None
    base.train()
    adapter = shared.attach(base, config, data=stats, forward_fn=loss_fn)
    params = adapter.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    curve = []
    for step in range(1, cfg["steps"] + 1):
        loss = loss_fn(base, next_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        adapter.step(opt)
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            base.eval()
            with torch.no_grad():
                curve.append((step, float(F.mse_loss(predict(base, held), held["target"])) / base_error))
            base.train()

    recall_switch, dash_share, per_layer = [], [], []
    for n in names:
        dash = adapter.dash_term(n)
        if dash is not None:
            recall_switch.append(overlap_with(truth[n][0], dash.indices))
            U, _, Vh = svd[n]
            lora_ds = tsd.delta_sigma(U[:, dash.indices], Vh[dash.indices], *adapter.update_factors(n))
            lam = dash.lam.detach().float().abs()
            dash_share.append(float(lam.sum() / (lam.sum() + lora_ds.abs().sum())))
        per_layer.append(recovery(*svd[n], *truth[n], *adapter.folded_factors(n), cfg["directions"]))
    return {"layers": len(names), "k": sorted({int(svd[n][1].numel()) for n in names}), "base_error": base_error,
            "relative_error": curve[-1][1], "error_curve": curve,
            "teacher_recall_at_switch": statistics.mean(recall_switch) if recall_switch else None,
            "dash_share": statistics.mean(dash_share) if dash_share else None,
            **{key: statistics.mean(r[key] for r in per_layer) for key in per_layer[0]},
            "by_layer_type": {ty: {key: statistics.mean(r[key] for n, r in zip(names, per_layer, strict=True)
                                                        if layer_type(n) == ty)
                                   for key in per_layer[0]} for ty in sorted({layer_type(n) for n in names})},
            "trainable_parameters": sum(p.numel() for p in params)}


def layer_type(name: str) -> str:
    """"attn1.to_q" (self-attention) ... "attn2.to_out.0" (cross-attention to the text)."""
    parts = name.split(".")
    i = max(i for i, p in enumerate(parts) if p.startswith("attn"))
    return ".".join(parts[i:])


def overlap_with(truth: torch.Tensor, found: torch.Tensor) -> float:
    """|truth ∩ found| / |truth|."""
    return len(set(truth.tolist()) & set(found.tolist())) / truth.numel()


def recovery(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, idx_true: torch.Tensor, ds_true: torch.Tensor,
             A: torch.Tensor, B: torch.Tensor, s: int) -> dict[str, float]:
    """How much of the teacher's change a learned update ΔW = B A recovered, along the teacher's own directions.

    ``teacher_recall_final``: overlap of top-s(δ) of ΔW with I* (the paper's rule); ``teacher_recall_final_abs``:
    the same for top-s(|Δσ|), without the division by σ that favours small-σ directions;
    ``recovered_change``: mean_i∈I* Δσ_i / Δσ*_i;
    ``energy_on_teacher``: ‖U_I*ᵀ ΔW V_I*‖_F² / ‖ΔW‖_F².
    """
    from shared import tsd

    ds = tsd.delta_sigma(U, Vh, B, A)
    chosen = tsd.select_directions(tsd.change_rate(S, ds), s)
    return {"teacher_recall_final": overlap_with(idx_true, chosen),
            "teacher_recall_final_abs": overlap_with(idx_true, tsd.select_directions(ds.abs(), s)),
            "recovered_change": float((ds[idx_true] / ds_true).mean()),
            "energy_on_teacher": tsd.energy_share(U[:, idx_true], Vh[idx_true], B, A)}


def report(records: list[dict[str, Any]], out_dir: Path) -> str:
    from .report import mean_std
    from .text_quality import METHODS

    done = [r for r in records if "result" in r]
    if not done:
        return ""
    c = done[0]["config"]
    key = lambda r: (f"{r['config']['teacher_band']}, δ* = {r['config']['teacher_rate']:g}", r["config"]["method"])  # noqa: E731
    groups = sorted({key(r) for r in done}, key=lambda g: (not g[0].startswith("moderate"), g[0], METHODS.index(g[1])))
    lines = [f"Teacher: {c['teacher_directions']} directions per layer (change rate δ* on them) on "
             f"{done[0]['result']['layers']} attention layers (k = {done[0]['result']['k']}); "
             f"student rank {c['rank']}, "
             f"s = {c['directions']}, dash switch at step {c['dash_warmup_steps']}, {c['steps']} steps of batch "
             f"{c['batch_size']} at lr {c['lr']:g}. A random choice of s directions recalls about s / k of I*.", "",
             "| teacher band | method | seeds | relative error ↓ | teacher recall at switch | teacher recall, final "
             "update: by δ / by abs Δσ | recovered change | update energy on I* | dash share | trainable params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    curves = {}
    for band, m in groups:
        rs = [r["result"] for r in done if key(r) == (band, m)]
        at_switch = [x["teacher_recall_at_switch"] for x in rs if x["teacher_recall_at_switch"] is not None]
        shares = [x["dash_share"] for x in rs if x["dash_share"] is not None]
        lines.append(f"| {band} | {m} | {len(rs)} | **{mean_std([x['relative_error'] for x in rs])}** "
                     f"| {mean_std(at_switch) if at_switch else '–'} "
                     f"| {mean_std([x['teacher_recall_final'] for x in rs])} / "
                     f"{mean_std([x['teacher_recall_final_abs'] for x in rs])} "
                     f"| {mean_std([x['recovered_change'] for x in rs])} "
                     f"| {mean_std([x['energy_on_teacher'] for x in rs])} "
                     f"| {mean_std(shares) if shares else '–'} | {rs[0]['trainable_parameters']:,} |")
        curves[(m, band)] = ([p[0] for p in rs[0]["error_curve"]],
                                   [statistics.mean(x["error_curve"][i][1] for x in rs)
                                    for i in range(len(rs[0]["error_curve"]))])
    types = sorted({ty for r in done for ty in r["result"]["by_layer_type"]})
    lines += ["", "By layer type (mean over seeds): teacher recall by abs Δσ / recovered change.", "",
              "| layer type | " + " | ".join(f"{m} ({band})" for band, m in groups) + " |",
              "|---|" + "---|" * len(groups)]
    for ty in types:
        cells = []
        for band, m in groups:
            rs = [r["result"]["by_layer_type"][ty] for r in done if key(r) == (band, m)]
            # + 0.0: no -0.000
            cells.append(f"{statistics.mean(x['teacher_recall_final_abs'] for x in rs):.2f} / "
                         f"{round(statistics.mean(x['recovered_change'] for x in rs), 3) + 0.0:.3f}")
        lines.append(f"| {ty} | " + " | ".join(cells) + " |")
    lines += ["", f"![teacher study]({_plot(curves, c, out_dir / 'teacher_error.png')})", ""]
    return "\n".join(lines)


def _plot(curves: dict[tuple[str, str], tuple[list[int], list[float]]], cfg: dict[str, Any], path: Path) -> str:
    """One panel per teacher band (their errors differ in scale), one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bands = list(dict.fromkeys(band for _, band in curves))
    methods = list(dict.fromkeys(m for m, _ in curves))
    fig, axes = plt.subplots(1, len(bands), figsize=(5 * len(bands), 4), squeeze=False)
    for ax, band in zip(axes[0], bands, strict=True):
        for (m, b), (x, y) in curves.items():
            if b == band:
                ax.plot(x, y, label=m, color=plt.cm.tab10(methods.index(m) % 10))
        ax.axvline(cfg["dash_warmup_steps"], color="gray", ls=":", lw=0.8)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out MSE to teacher / base's")
        ax.set_title(f"{band} band", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("teacher study (mean over seeds; dotted: the dash switch)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
