"""Validation during and after training: seeded images per prompt from the pipeline being trained, saved with a
grid (a row per prompt) and, when the base ships an evaluator (the mini SDXL), the subject metrics per prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.io import atomic_write_json

from .evaluation import SubjectEvaluator
from .mini_sdxl import to_uint8
from .models import SDXLParts

#: denoising steps of a validation image (``--validation_inference_steps``'s default)
VALIDATION_INFERENCE_STEPS = 25
#: a grid of smaller images is enlarged (nearest) to about this many pixels per image
GRID_MIN_CELL = 96


@dataclass(frozen=True)
class ValidationSettings:
    """What a validation draws: ``num_images`` per prompt, seeded by ``seed``, at ``resolution``."""

    prompts: list[str]
    num_images: int
    seed: int
    inference_steps: int
    resolution: int


@torch.no_grad()
def generate(pipe: Any, prompt: str, num_images: int, seed: int, steps: int, resolution: int) -> torch.Tensor:
    """The validation images of one prompt (CPU generator seeded with ``seed``): N x 3 x R x R in [-1, 1]."""
    images = pipe(prompt, num_images_per_prompt=num_images, generator=torch.Generator(device="cpu").manual_seed(seed),
                  num_inference_steps=steps, height=resolution, width=resolution, output_type="pt").images
    return images.float().cpu() * 2 - 1


def save_grid(rows: list[np.ndarray], path: Path, resolution: int) -> None:
    """Save uint8 image rows (each N x H x W x 3) as one grid, enlarged (nearest) when the images are small."""
    from PIL import Image

    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    scale = max(1, GRID_MIN_CELL // resolution)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST).save(path)


@torch.no_grad()
def run_validation(parts: SDXLParts, accelerator: Any, settings: ValidationSettings, step: int, out_dir: Path,
                   evaluator: SubjectEvaluator | None = None) -> tuple[list[Path], list[dict[str, Any]]]:
    """Validate at ``step`` into ``out_dir/step-<step>/``: the images of every prompt (``prompt<i>-<j>.png``),
    ``grid.png``, ``prompts.json`` and, with an ``evaluator``, ``metrics.json`` (printed too). The trained modules
    are put in eval mode for it and back in train mode after. Returns the image paths and the metrics."""
    from PIL import Image

    pipe = parts.pipeline(accelerator)
    trained = [m for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) if m.training]
    for m in trained:
        m.eval()
    step_dir = out_dir / f"step-{step}"
    step_dir.mkdir(parents=True, exist_ok=True)
    paths, rows, metrics = [], [], []
    for i, prompt in enumerate(settings.prompts):
        images = generate(pipe, prompt, settings.num_images, settings.seed, settings.inference_steps,
                          settings.resolution)
        pixels = to_uint8(images)
        for j, img in enumerate(pixels):
            path = step_dir / f"prompt{i}-{j}.png"
            Image.fromarray(img).save(path)
            paths.append(path)
        rows.append(pixels)
        if evaluator is not None:
            metrics.append(evaluator.score(prompt, images))
    save_grid(rows, step_dir / "grid.png", settings.resolution)
    atomic_write_json(step_dir / "prompts.json", settings.prompts)
    if metrics:
        atomic_write_json(step_dir / "metrics.json", metrics)
        for m in metrics:
            accuracy = f", class accuracy {m['class_accuracy']:.2f}" if m["class_accuracy"] is not None else ""
            accelerator.print(f"validation step {step}: {m['prompt']!r}: "
                              f"subject probe {m['subject_probe']:.2f}{accuracy}")
    for m in trained:
        m.train()
    return paths, metrics
