"""The DreamBooth denoising loss: the UNet's conditioning of a batch, the noise (with diffusers' offset noise),
the epsilon or v target, Min-SNR weighting, the prior-preservation term, and the batches the data-driven inits
read, fed as the training step feeds the UNet."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import DreamBoothDataset, collate

#: prompts -> (prompt embeddings, pooled embeddings)
Condition = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def unet_loss(unet: Any, scheduler: Any, latents: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
              time_ids: torch.Tensor, *, snr_gamma: float | None = None, generator: torch.Generator | None = None,
              reduce: bool = True, noise_offset: float = 0.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising loss at uniform timesteps (epsilon or v target), optionally Min-SNR weighted.

    ``noise_offset`` adds ``noise_offset * n`` with ``n ~ N(0, 1)`` per sample and channel (constant over the
    image) to the noise, as diffusers' ``--noise_offset`` (Guttenberg 2023), so the model learns to shift the mean
    brightness. With ``mask`` (B x 1 x h x w at the latents' size, :func:`latent_mask`) a sample's loss is
    ``mean over (c, y, x) of mask · (pred - target)²`` (kohya's ``--masked_loss``: the mean keeps the masked-out
    positions as zeros, so a mask of all ones is the plain loss and a masked-out position gets no gradient).
    With ``snr_gamma`` each sample's loss is weighted by ``min(SNR(t), gamma) / SNR(t)`` (epsilon) or
    ``/ (SNR(t) + 1)`` (v prediction), Min-SNR (Hang et al. 2023). ``reduce=False`` returns the per-sample losses.
    """
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                                   device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        loss = loss * mask.to(loss.device, loss.dtype)
    loss = loss.mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, t)
        weight = torch.clamp(snr, max=snr_gamma) / (snr if scheduler.config.prediction_type == "epsilon" else snr + 1)
        loss = loss * weight
    return loss.mean() if reduce else loss


def latent_mask(masks: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Pixel-space loss masks (B x 1 x H x W in [0, 1]) resized to the latents' spatial size by area averaging
    (a latent position's weight is the mean weight of the pixels it covers)."""
    return F.interpolate(masks.to(latents.device, torch.float32), size=latents.shape[-2:], mode="area")


def prior_preservation_loss(per_sample: torch.Tensor, is_class: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """DreamBooth's loss of a batch: the mean over its instance images plus ``prior_loss_weight`` times the mean
    over its class images (0 when it has none). Written as masked sums, so no step waits for the device (boolean
    indexing and ``if tensor.any()`` would)."""
    cls = is_class.to(per_sample.device, per_sample.dtype, non_blocking=True)
    inst = 1 - cls
    return ((per_sample * inst).sum() / inst.sum()
            + prior_loss_weight * (per_sample * cls).sum() / cls.sum().clamp(min=1))


def unet_conditioning(condition: Condition, batch: dict[str, Any], device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt embeddings, pooled embeddings and SDXL time ids of ``batch`` on the UNet's device and dtype (what the
    training step and the data-driven inits feed it); ``condition`` maps prompts to (embeddings, pooled)."""
    embeds, pooled = condition(batch["prompts"])
    return embeds.to(dtype), pooled.to(dtype), batch["time_ids"].to(device, dtype)


def sequential_batches(length: int, num_batches: int, batch_size: int) -> list[list[int]]:
    """``num_batches`` batches of item indices: the items in order, wrapping round."""
    return [[(i * batch_size + j) % length for j in range(batch_size)] for i in range(num_batches)]


@torch.no_grad()
def statistics_batches(dataset: DreamBoothDataset, index_batches: list[list[int]], condition: Condition,
                       latents_for: Callable[[dict[str, Any]], torch.Tensor], device: torch.device,
                       dtype: torch.dtype) -> list[dict[str, Any]]:
    """The instance batches of ``index_batches`` (dataset item indices; :func:`sequential_batches`, or the bucket
    schedule's first batches with ``--enable_bucket``) for the data-driven inits: latents and conditioning as the
    training step feeds them, each with its index ``i``."""
    out = []
    for i, idx in enumerate(index_batches):
        batch = collate([dataset[k] for k in idx])
        embeds, pooled, time_ids = unet_conditioning(condition, batch, device, dtype)
        out.append({"i": i, "latents": latents_for(batch), "embeds": embeds, "pooled": pooled, "time_ids": time_ids})
    return out


def statistics_loss(scheduler: Any, seed: int,
                    device: torch.device) -> Callable[[nn.Module, dict[str, Any]], torch.Tensor]:
    """The inits' ``forward_fn``: the denoising loss of a :func:`statistics_batches` batch, its noise and timesteps
    seeded by ``seed + i`` (the same draws on every process and every run)."""
    generator = torch.Generator(device=device)

    def forward_fn(unet: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        generator.manual_seed(seed + batch["i"])
        return unet_loss(unet, scheduler, batch["latents"], batch["embeds"], batch["pooled"], batch["time_ids"],
                         generator=generator)

    return forward_fn
