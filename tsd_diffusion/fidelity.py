"""Subject and prompt fidelity as the DreamBooth paper measures them (Ruiz et al., CVPR 2023, Sec. 4.1):
``--eval_dino_model`` and ``--eval_clip_model``.

With generated images g_1..g_N of a prompt p, the real instance images r_1..r_M as references, and unit-normalised
embeddings (f̂ = f / ‖f‖):

- **DINO** = (1 / NM) Σ_i Σ_j ⟨f̂(g_i), f̂(r_j)⟩, f the CLS embedding (``last_hidden_state[:, 0]``) of a
  self-supervised ViT: DINO ViT-S/16 as in the paper (``facebook/dino-vits16``) or DINOv2;
- **CLIP-I** = the same mean with f the CLIP image embedding (``get_image_features``);
- **CLIP-T** = (1 / N) Σ_i ⟨t̂(p), ĉ(g_i)⟩, t the CLIP text embedding of the prompt as written and c the CLIP
  image embedding.

Every image goes through the model's own image processor (its resize, crop and normalisation). The numbers mean
what the paper's do only with the paper's weights, which the user supplies (a local transformers dir or a hub id);
the project's tests run the code on small random-weight models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.errors import InputError

#: the metric names this module writes, in order
METRICS = ("dino", "clip_i", "clip_t")


def check_model_source(flag: str, source: str | None) -> None:
    """Refuse a model source that cannot be one, naming ``flag``: a path (absolute, ``./``, ``~``) that is not a
    directory with a ``config.json``. A hub id is accepted here and checked when it loads."""
    if source is None:
        return
    path = Path(source).expanduser()
    looks_local = source.startswith(("/", ".", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise InputError(f"{flag} {source}: not a transformers model dir (no config.json there)")


def _load(flag: str, source: str, loader: Any, **kw: Any) -> Any:
    try:
        return loader.from_pretrained(source, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{flag} {source}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` returns the embedding (transformers 4) or an output with it as ``pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def to_pil(images: torch.Tensor) -> list[Any]:
    """N x 3 x H x W in [-1, 1] -> PIL images (8 bit, as saved)."""
    from PIL import Image

    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """(1 / |a||b|) Σ_i Σ_j cos(a_i, b_j) for row sets ``a`` and ``b`` (float64)."""
    return float((F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T).mean())


class FidelityScorer:
    """DINO, CLIP-I and CLIP-T of generations against the instance images ``references`` (PIL images)."""

    def __init__(self, references: list[Any], *, dino: str | None = None, clip: str | None = None,
                 device: torch.device | str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        self.device = torch.device(device)
        self.dino = self.clip = None
        if dino is not None:
            self.dino = _load("--eval_dino_model", dino, AutoModel).to(self.device).eval()
            self.dino_processor = _load("--eval_dino_model", dino, AutoImageProcessor)
        if clip is not None:
            self.clip = _load("--eval_clip_model", clip, CLIPModel).to(self.device).eval()
            self.clip_processor = _load("--eval_clip_model", clip, AutoImageProcessor)
            self.clip_tokenizer = _load("--eval_clip_model", clip, AutoTokenizer)
        self.references = self.embed_images(references)

    @torch.no_grad()
    def embed_images(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """The DINO CLS and CLIP image embeddings of PIL ``images`` (those of the models given)."""
        out = {}
        if self.dino is not None:
            pix = self.dino_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            out["dino"] = self.dino(pixel_values=pix).last_hidden_state[:, 0].float().cpu()
        if self.clip is not None:
            pix = self.clip_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
            out["clip"] = _features(self.clip.get_image_features(pixel_values=pix)).float().cpu()
        return out

    @torch.no_grad()
    def embed_text(self, prompt: str) -> torch.Tensor:
        ids = self.clip_tokenizer([prompt], padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _features(self.clip.get_text_features(**ids)).float().cpu()

    def score(self, prompt: str, images: torch.Tensor) -> dict[str, float]:
        """The metrics of one prompt's generations (N x 3 x H x W in [-1, 1])."""
        generated = self.embed_images(to_pil(images))
        out = {}
        if "dino" in generated:
            out["dino"] = mean_pairwise_cosine(generated["dino"], self.references["dino"])
        if "clip" in generated:
            out["clip_i"] = mean_pairwise_cosine(generated["clip"], self.references["clip"])
            out["clip_t"] = mean_pairwise_cosine(generated["clip"], self.embed_text(prompt))
        return out
