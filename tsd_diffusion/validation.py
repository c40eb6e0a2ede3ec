"""Validation during and after training: seeded images per prompt from the pipeline being trained, saved with a
grid (a row per prompt), and the metrics per prompt: the mini SDXL's own subject metrics (when the base ships
its evaluator) and the DreamBooth paper's DINO, CLIP-I and CLIP-T (``--eval_dino_model``, ``--eval_clip_model``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.io import atomic_write_json

from .evaluation import SubjectEvaluator
from .fidelity import FidelityScorer
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
                   evaluator: SubjectEvaluator | None = None,
                   fidelity: FidelityScorer | None = None) -> tuple[list[Path], list[dict[str, Any]]]:
    """Validate at ``step`` into ``out_dir/step-<step>/``: the images of every prompt (``prompt<i>-<j>.png``),
    ``grid.png``, ``prompts.json`` and, with an ``evaluator`` (the mini SDXL's probe metrics) and/or a
    ``fidelity`` scorer (DINO, CLIP-I, CLIP-T), ``metrics.json`` with one dict per prompt, printed, sent to the
    trackers as ``validation/prompt<i>/<metric>`` and plotted over the steps so far (``out_dir/metrics.png``). The
    trained modules are put in eval mode for it and back in train mode after. Returns the image paths and the
    metrics."""
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
        if evaluator is not None or fidelity is not None:
            scores: dict[str, Any] = {"prompt": prompt, "num_images": len(images)}
            scores.update(evaluator.score(prompt, images) if evaluator is not None else {})
            scores.update(fidelity.score(prompt, images) if fidelity is not None else {})
            metrics.append(scores)
    save_grid(rows, step_dir / "grid.png", settings.resolution)
    atomic_write_json(step_dir / "prompts.json", settings.prompts)
    if metrics:
        atomic_write_json(step_dir / "metrics.json", metrics)
        accelerator.log({f"validation/prompt{i}/{k}": v for i, m in enumerate(metrics)
                         for k, v in numeric_metrics(m).items()}, step=step)
        for m in metrics:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in numeric_metrics(m).items() if k in SHOWN)
            accelerator.print(f"validation step {step}: {m['prompt']!r}: {shown}")
        plot_metrics(out_dir)
    for m in trained:
        m.train()
    return paths, metrics


#: the metrics printed after a validation (all are in metrics.json)
SHOWN = ("subject_probe", "class_accuracy", "dino", "clip_i", "clip_t")


def numeric_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of one prompt's metrics (no prompt, class name, counts or empty values)."""
    return {k: float(v) for k, v in scores.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_images"}


def read_metrics(out_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """Every validation's ``metrics.json`` under ``out_dir`` (``step-N/``), by step."""
    found = {}
    for path in Path(out_dir).glob("step-*/metrics.json"):
        step = path.parent.name[len("step-"):]
        if step.isdigit():
            found[int(step)] = json.loads(path.read_text())
    return dict(sorted(found.items()))


def plot_metrics(out_dir: Path) -> Path | None:
    """``out_dir/metrics.png``: every numeric metric over the validation steps, a line per prompt (None without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_step = read_metrics(out_dir)
    names = sorted({k for ms in by_step.values() for m in ms for k in numeric_metrics(m)})
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        prompts = sorted({m["prompt"] for ms in by_step.values() for m in ms})
        for prompt in prompts:
            points = [(s, numeric_metrics(m)[name]) for s, ms in by_step.items() for m in ms
                      if m["prompt"] == prompt and name in numeric_metrics(m)]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=prompt[:40])
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = Path(out_dir) / "metrics.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
