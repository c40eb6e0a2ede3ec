"""The frozen SDXL the trainer adapts: its components loaded as a real SDXL is (``from_pretrained``), prompt
encoding (SDXL's two text encoders) and VAE latents, with the caches the trainer keeps of both."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .data import LatentCache

#: the UNet's attention projections and the text encoders' (diffusers' DreamBooth LoRA targets)
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
#: accelerate's mixed-precision names -> the dtype of the frozen weights (others: float32)
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


class SDXLParts:
    """The frozen pipeline components the trainer needs, loaded through ``from_pretrained`` like a real SDXL.

    ``base`` is a hub id or a local diffusers pipeline dir; ``vae`` an fp16-safe VAE to use instead of the base's
    (e.g. ``madebyollin/sdxl-vae-fp16-fix``).
    """

    def __init__(self, base: str, *, revision: str | None = None, variant: str | None = None,
                 vae: str | None = None) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        self.base, self.revision, self.variant = base, revision, variant
        kw = dict(revision=revision)
        self.tokenizers = [AutoTokenizer.from_pretrained(base, subfolder=f, use_fast=False, **kw)
                           for f in ("tokenizer", "tokenizer_2")]
        # float32 first, as diffusers' scripts load (transformers would keep fp16-saved weights in fp16); the
        # trainer casts to the mixed-precision dtype itself
        self.text_encoders = [CLIPTextModel.from_pretrained(base, subfolder="text_encoder", variant=variant,
                                                            dtype=torch.float32, **kw),
                              CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2",
                                                                          variant=variant, dtype=torch.float32, **kw)]
        self.vae = (AutoencoderKL.from_pretrained(vae) if vae else
                    AutoencoderKL.from_pretrained(base, subfolder="vae", variant=variant, **kw))
        self.unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=variant, **kw)
        self.scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kw)
        self.vae_fp16_safe = bool(vae)
        index = Path(base) / "model_index.json"  # a hub id: SDXL's default
        self.zeros_for_empty_prompt = (json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)
                                       if index.is_file() else True)
        for m in (self.vae, self.unet, *self.text_encoders):
            m.requires_grad_(False)

    def place(self, device: torch.device, dtype: torch.dtype) -> SDXLParts:
        """Move to ``device`` and cast to ``dtype``; SDXL's own VAE stays fp32 (it overflows in fp16)."""
        vae_dtype = dtype if self.vae_fp16_safe else torch.float32
        for module, d in [(self.unet, dtype), (self.vae, vae_dtype), *((e, dtype) for e in self.text_encoders)]:
            module.to(device)
            if d != torch.float32:
                module.to(dtype=d)
        return self

    def pipeline(self, accelerator: Any) -> Any:
        """A ``StableDiffusionXLPipeline`` over these components (the trained ones unwrapped), without progress bars."""
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(
            self.base, vae=self.vae, unet=accelerator.unwrap_model(self.unet),
            text_encoder=accelerator.unwrap_model(self.text_encoders[0]),
            text_encoder_2=accelerator.unwrap_model(self.text_encoders[1]), revision=self.revision,
            variant=self.variant,
        ).to(accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL conditioning: penultimate hidden states of both encoders concatenated, pooled from the second.

        The empty prompt gets zeros when the pipeline's ``force_zeros_for_empty_prompt`` is set (SDXL's default):
        that is what the pipeline feeds the unconditional branch of classifier-free guidance.
        """
        embeds, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            out = enc(ids, output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        embeds = torch.cat(embeds, dim=-1)
        if self.zeros_for_empty_prompt and "" in prompts:
            keep = torch.tensor([p != "" for p in prompts], device=embeds.device)
            embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        return embeds, pooled

    @torch.no_grad()
    def latent_params(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE posterior (mean, std) stacked on dim 1, so cached and fresh latents sample the same way."""
        dist = self.vae.encode(pixel_values.to(self.vae.device, self.vae.dtype)).latent_dist
        return torch.stack([dist.mean, dist.std], 1).float().contiguous()

    def sample_latents(self, params: torch.Tensor) -> torch.Tensor:
        """Latents drawn from the posterior ``params`` (:meth:`latent_params`), scaled (and shifted, where the VAE
        has latent statistics) as the UNet expects them."""
        # noise drawn by shape, not randn_like: the VAE may return channels-last tensors, and randn_like follows
        # their strides, so cached and fresh latents would get different noise for the same RNG state
        noise = torch.randn(params[:, 0].shape, device=params.device, dtype=params.dtype)
        latents = params[:, 0] + params[:, 1] * noise
        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents)
            return (latents - mean) * cfg.scaling_factor / std
        return latents * cfg.scaling_factor


class PromptConditioner:
    """Prompts -> (embeddings, pooled embeddings) from ``parts``' text encoders.

    While the text encoders train, every call encodes (with grad). While they are frozen, each distinct prompt is
    encoded once, alone and without grad, and kept in memory (a batch of one prompt is a broadcast view of its
    embedding, as a minimal loop would feed it). :meth:`precompute` encodes a whole prompt set up front
    (``--cache_text_encoder_outputs``); with a ``store`` (``--cache_text_encoder_outputs_to_disk``) the embeddings
    are also read from and written to that safetensors file, which is valid only for text encoders of the same
    :func:`encoder_fingerprint` and keeps only the prompts of the current set (a changed caption is re-encoded).
    """

    def __init__(self, parts: SDXLParts, text_encoders_train: bool, store: Path | None = None) -> None:
        self.parts, self.text_encoders_train, self.store = parts, text_encoders_train, store
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoders_train:
            return self.parts.encode_prompt(prompts)
        for p in dict.fromkeys(prompts):
            if p not in self.cache:
                self.cache[p] = self._encode(p)
        if len(set(prompts)) == 1:
            e, pool = self.cache[prompts[0]]
            return e.expand(len(prompts), *e.shape), pool.expand(len(prompts), *pool.shape)
        return (torch.stack([self.cache[p][0] for p in prompts]),
                torch.stack([self.cache[p][1] for p in prompts]))

    @torch.no_grad()
    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        e, pool = self.parts.encode_prompt([prompt])
        return e[0], pool[0]

    def precompute(self, prompts: list[str], write: bool = True) -> dict[str, int]:
        """Encode every prompt of ``prompts`` now (from the store where it holds them); with a store and
        ``write`` (the main process), rewrite it when its prompt set changed. Returns counts: ``loaded`` from the
        store, ``encoded`` afresh."""
        if self.text_encoders_train:
            raise ValueError("the text encoders train: their outputs change every step and cannot be cached")
        wanted = list(dict.fromkeys(prompts))
        fingerprint = encoder_fingerprint(self.parts) if self.store is not None else None
        stored = read_embedding_store(self.store, fingerprint) if self.store is not None else {}
        loaded = 0
        for p in wanted:
            if p in self.cache:
                continue
            if p in stored:
                device = self.parts.text_encoders[0].device
                self.cache[p] = tuple(t.to(device) for t in stored[p])
                loaded += 1
            else:
                self.cache[p] = self._encode(p)
        if self.store is not None and write and set(stored) != set(wanted):
            write_embedding_store(self.store, fingerprint, {p: self.cache[p] for p in wanted})
        return {"loaded": loaded, "encoded": len(wanted) - loaded}


def _key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()


@torch.no_grad()
def encoder_fingerprint(parts: SDXLParts) -> str:
    """Identifies what the text encoders compute: their parameters' dtypes and per-tensor sums and sums of
    squares (float64), the tokenizers' sizes and the empty-prompt rule. Another base or precision changes it."""
    h = hashlib.sha256()
    h.update(json.dumps([parts.zeros_for_empty_prompt, [(len(t), t.model_max_length) for t in parts.tokenizers]])
             .encode())
    for enc in parts.text_encoders:
        stats = [torch.stack([p.double().sum(), p.double().square().sum()]) for p in enc.parameters()]
        h.update(str(next(enc.parameters()).dtype).encode())
        h.update(torch.stack(stats).cpu().numpy().tobytes())
    return h.hexdigest()


def read_embedding_store(path: Path, fingerprint: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The (embeddings, pooled) by prompt of an embedding store; ``{}`` when the file is missing or was written
    for other text encoders."""
    from safetensors import safe_open

    if not Path(path).is_file():
        return {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            return {}
        prompts = json.loads(meta.get("prompts", "{}"))
        return {p: (f.get_tensor(f"embeds.{k}"), f.get_tensor(f"pooled.{k}")) for k, p in prompts.items()}


def write_embedding_store(path: Path, fingerprint: str,
                          embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write the (embeddings, pooled) of every prompt, with the fingerprint of the text encoders, atomically."""
    from shared.io import save_safetensors

    tensors, prompts = {}, {}
    for p, (e, pool) in embeddings.items():
        k = _key(p)
        tensors[f"embeds.{k}"], tensors[f"pooled.{k}"], prompts[k] = e, pool, p
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata={"fingerprint": fingerprint, "prompts": json.dumps(prompts)})


class LatentSampler:
    """A collated batch -> latents sampled from the VAE posterior of its pixels, on ``device`` in ``dtype``.

    With a :class:`~tsd_diffusion.data.LatentCache` the posterior of each (image, augmentation) is computed once
    (the batch's ``cache_keys``); the latents are drawn afresh every time either way.
    """

    def __init__(self, parts: SDXLParts, device: torch.device, dtype: torch.dtype,
                 cache: LatentCache | None = None) -> None:
        self.parts, self.device, self.dtype, self.cache = parts, device, dtype, cache

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        pix = batch["pixel_values"]
        if self.cache is None:
            params = self.parts.latent_params(pix)
        else:
            params = self.cache.get_or_compute(batch["cache_keys"], lambda idx: self.parts.latent_params(pix[idx]))
        return self.parts.sample_latents(params.to(self.device)).to(self.dtype)
