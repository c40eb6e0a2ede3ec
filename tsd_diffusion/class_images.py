"""Prior-preservation class images sampled from the base model, as diffusers' DreamBooth scripts do.

With ``--with_prior_preservation`` and a ``--class_prompt``, a ``--class_data_dir`` that is missing or holds fewer
than ``--num_class_images`` usable images is topped up: the missing images are sampled from the frozen base with
``--class_prompt`` (``--sample_batch_size`` per pipeline call, the pipeline's default number of denoising steps),
split across processes. Without ``--class_prompt`` a dir that holds some images is used as it is (a captioned
replay prior). Image ``i`` is seeded by ``(--seed, i)``, so a rerun, or a run with another number of processes, gives
the same files. Each is written atomically as ``{i:05d}-{sha1[:12]}.jpg``, so an interrupted run keeps what it
finished and the next run only samples the rest.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from shared.errors import InputError
from shared.io import atomic_write_bytes

from .data import image_candidates, list_instance_images

JPEG_QUALITY = 95


def missing_class_images(class_data_dir: str | Path | None, num_class_images: int, class_prompt: str | None,
                         instance_data_dir: str | Path) -> int:
    """How many class images to sample into ``class_data_dir`` (0 when it is None: no prior preservation) to have
    ``num_class_images``; checks the dirs before any model loads.

    The class dir's files are counted without decoding: with nothing to sample, the dataset decodes every file
    before any model loads. When sampling is needed the dataset is built only after it, so both dirs are
    decoded here (a bad file is named).
    """
    if not class_data_dir:
        return 0
    class_dir = Path(class_data_dir).expanduser()
    have = len(image_candidates(class_dir, "class", allow_empty=True))
    missing = max(0, num_class_images - have)
    if missing and not class_prompt:
        if not have:
            raise InputError(f"class data dir {class_dir} holds no images; sampling --num_class_images="
                             f"{num_class_images} from the base needs --class_prompt")
        print(f"warning: class data dir {class_dir} holds {have} of --num_class_images={num_class_images} "
              "images; without --class_prompt none are sampled, so the prior uses those it holds")
        return 0
    if missing:
        list_instance_images(class_dir, "class", allow_empty=True)
        list_instance_images(instance_data_dir, "instance")
    return missing


@torch.no_grad()
def sample_class_images(pipe: Any, accelerator: Any, class_dir: str | Path, prompt: str, count: int, *,
                        batch_size: int, resolution: int, seed: int) -> list[Path]:
    """Sample ``count`` images of ``prompt`` into ``class_dir`` (numbered after the images already there).

    ``pipe`` is a ``StableDiffusionXLPipeline`` on this process's device; the UNet's latents are decoded by the VAE
    at its own dtype (SDXL's VAE overflows in fp16). Returns the files this process wrote.
    """
    from tqdm.auto import tqdm

    class_dir = Path(class_dir).expanduser()
    class_dir.mkdir(parents=True, exist_ok=True)
    start = len(image_candidates(class_dir, "class", allow_empty=True))  # decoded by missing_class_images
    accelerator.wait_for_everyone()  # every process counted before any writes: they agree on the numbering
    written: list[Path] = []
    with accelerator.split_between_processes(list(range(start, start + count))) as mine:
        batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        for batch in tqdm(batches, desc="sampling class images", disable=not accelerator.is_local_main_process):
            generators = [torch.Generator("cpu").manual_seed(seed * 1_000_003 + i) for i in batch]
            latents = pipe(prompt, num_images_per_prompt=len(batch), generator=generators, height=resolution,
                           width=resolution, output_type="latent").images
            for i, image in zip(batch, _decode(pipe, latents), strict=True):
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=JPEG_QUALITY)
                data = buf.getvalue()
                path = class_dir / f"{i:05d}-{hashlib.sha1(data).hexdigest()[:12]}.jpg"
                atomic_write_bytes(path, data)
                written.append(path)
    accelerator.wait_for_everyone()
    return written


def _decode(pipe: Any, latents: torch.Tensor) -> list[Any]:
    """PIL images from SDXL latents, decoded at the VAE's dtype (as the pipeline does after denoising)."""
    vae = pipe.vae
    latents = latents.to(device=next(vae.parameters()).device, dtype=vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        latents = (latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor
                   + torch.tensor(mean).view(shape).to(latents))
    else:
        latents = latents / vae.config.scaling_factor
    images = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pil")
