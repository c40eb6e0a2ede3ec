"""The tiny SDXL (``tsd-lora/tiny-sdxl``): random weights of the real SDXL architecture for fast plumbing tests,
built locally from configs; the name resolution of the embedded bases; the subject images the project draws.

No weights are downloaded (none of SDXL's are on any package registry). :func:`materialize_tiny_sdxl` builds a
``StableDiffusionXLPipeline`` with randomly initialised (seeded, deterministic) components of the *same classes and
wiring* as SDXL and saves it like a hub snapshot, so everything downstream loads it through the ordinary
``StableDiffusionXLPipeline.from_pretrained(dir)`` path:

- ``unet``: ``UNet2DConditionModel`` with SDXL's conditioning: ``addition_embed_type="text_time"`` (pooled text
  embeds + 6 micro-conditioning time ids), ``cross_attention_dim = hidden(te1) + hidden(te2)``, linear-projection
  transformer blocks with ``to_q/to_k/to_v/to_out.0`` (the LoRA targets), down ``DownBlock2D, CrossAttnDownBlock2D``,
  up ``CrossAttnUpBlock2D, UpBlock2D``. ``sample_size=32`` latents, i.e. 64x64 images with the tiny VAE;
- ``vae``: ``AutoencoderKL`` with 2 blocks (scale factor 2, so 64 px images <-> 32x32x4 latents), SDXL's
  ``scaling_factor`` 0.13025;
- ``text_encoder``: ``CLIPTextModel`` (hidden 32, quick_gelu like SDXL's CLIP-L); ``text_encoder_2``:
  ``CLIPTextModelWithProjection`` (hidden 48, projection 48, gelu like SDXL's OpenCLIP-bigG). The two widths differ on
  purpose, as in SDXL (768 vs 1280), so code that mixes them up fails here too;
- ``tokenizer`` / ``tokenizer_2``: the real CLIP BPE vocabulary (49408 tokens; ``tokenizer_2`` pads with ``"!"``
  like SDXL's), the files the mini SDXL ships (``tsd_diffusion/weights/mini-sdxl/tokenizer``);
- ``scheduler``: ``EulerDiscreteScheduler`` with SDXL's config (scaled_linear 0.00085..0.012, leading spacing,
  steps_offset 1).

Sizes: UNet about 1.1 M params, VAE 44 k, text encoders 1.6 M / 2.4 M (mostly the 49408-token embeddings). A 64x64
DreamBooth LoRA step takes about 0.1 s on 2 CPU cores.

Cache layout: ``<cache>/tiny-sdxl-v1/``, with ``-seed<N>`` appended for a non-default seed. Each is built in a temp
dir inside the cache, gets a ``done`` marker and is renamed into place (a per-variant file lock serialises
concurrent builders), so a pipeline dir is either complete or absent and later calls return it without rebuilding.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from shared.errors import InputError, MissingInputError
from tsd_common.cache import build_cached_dir, is_complete
from tsd_common.cache import cache_dir as default_cache_dir

from .mini_sdxl import MINI_NAME, TOKENIZER_DIRS, WEIGHTS_DIR

__all__ = [
    "EMBEDDED_NAME",
    "TINY_SDXL_VERSION",
    "build_tiny_sdxl_pipeline",
    "materialize_tiny_sdxl",
    "make_subject_images",
    "resolve_pretrained",
]

EMBEDDED_NAME = "tsd-lora/tiny-sdxl"
TINY_SDXL_VERSION = 1  # bump when the configs below change: the cache dir name carries it
INFO_FILE = "tsd_tiny_sdxl.json"
BUILD_COUNT = 0  # how many pipelines this process has built (tests use it to check cache hits)

# component sizes (see the module docstring)
TE1_HIDDEN, TE2_HIDDEN, TE2_PROJ = 32, 48, 48
TIME_EMBED_DIM = 8
CLIP_TOKENIZER_DIR = WEIGHTS_DIR / TOKENIZER_DIRS[0]  # the real CLIP BPE (vocab.json, merges.txt)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# --------------------------------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------------------------------


def build_tiny_sdxl_pipeline(tokenizer_dir: str | os.PathLike, seed: int = 0):
    """Build (do not save) the tiny SDXL pipeline with the CLIP tokenizer files in ``tokenizer_dir``.

    Deterministic for a seed; the global torch RNG state is left as it was.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77, pad_token="<|endoftext|>")
    tok2 = CLIPTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=77, pad_token="!")
    common = dict(vocab_size=len(tok), intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    te1_cfg = CLIPTextConfig(hidden_size=TE1_HIDDEN, hidden_act="quick_gelu", projection_dim=TE1_HIDDEN, **common)
    te2_cfg = CLIPTextConfig(hidden_size=TE2_HIDDEN, hidden_act="gelu", projection_dim=TE2_PROJ, **common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
            addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TE2_PROJ,  # 6 time ids + pooled te2
            cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,  # penultimate hidden states of both encoders, concatenated
            norm_num_groups=8)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=64, scaling_factor=0.13025)
        torch.manual_seed(seed + 2)
        te1 = CLIPTextModel(te1_cfg)
        torch.manual_seed(seed + 3)
        te2 = CLIPTextModelWithProjection(te2_cfg)
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                   prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)


def materialize_tiny_sdxl(cache_dir: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Build the embedded tiny SDXL pipeline once and return its directory (a ``from_pretrained``-able snapshot).

    ``cache_dir``: default :func:`tsd_common.cache.cache_dir`. The tokenizers are the shipped CLIP BPE files
    (:data:`CLIP_TOKENIZER_DIR`). A second call returns the cached dir without rebuilding (see the module docstring).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    root = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()
    final = root / (f"tiny-sdxl-v{TINY_SDXL_VERSION}" + ("" if seed == 0 else f"-seed{seed}"))
    if is_complete(final):
        return final
    t0 = time.time()

    def build(out: Path, _: Path) -> None:
        global BUILD_COUNT
        import diffusers
        import torch
        import transformers

        pipe = build_tiny_sdxl_pipeline(CLIP_TOKENIZER_DIR, seed=seed)
        pipe.save_pretrained(out, safe_serialization=True)
        for sub in ("tokenizer", "tokenizer_2"):  # like a hub snapshot, and loadable by transformers 4 too
            for f in ("vocab.json", "merges.txt"):
                if not (out / sub / f).is_file():
                    shutil.copyfile(CLIP_TOKENIZER_DIR / f, out / sub / f)
        info = {
            "name": EMBEDDED_NAME,
            "version": TINY_SDXL_VERSION,
            "seed": seed,
            "tokenizer": "clip-bpe-49408 (the real CLIP BPE vocabulary the mini SDXL ships)",
            "vocab_size": len(pipe.tokenizer),
            "params": {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                       for k in ("unet", "vae", "text_encoder", "text_encoder_2")},
            "built_with": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__},
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.time() - t0, 2),
        }
        (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        BUILD_COUNT += 1

    return build_cached_dir(final, build, {"name": EMBEDDED_NAME, "version": TINY_SDXL_VERSION})


def resolve_pretrained(name_or_path: str | os.PathLike) -> str:
    """Map ``--pretrained_model_name_or_path`` to what ``StableDiffusionXLPipeline.from_pretrained`` gets.

    - :data:`EMBEDDED_NAME` (``"tsd-lora/tiny-sdxl"``) -> the materialized local dir (built on first use);
    - ``"tsd-lora/mini-sdxl"`` -> the shipped CIFAR-pretrained mini SDXL (:data:`tsd_diffusion.mini_sdxl.WEIGHTS_DIR`,
      a complete pipeline dir);
    - an existing local directory -> itself, after checking it holds ``model_index.json`` (ValueError otherwise);
    - an existing file -> ValueError (single-file checkpoints are not supported; give a diffusers pipeline dir);
    - something that looks like a local path but does not exist (absolute, ``./``, ``~``, more than one ``/``)
      -> ValueError, instead of a confusing hub error;
    - anything else (``org/name``) -> unchanged, as a hub id: diffusers fetches it (offline that fails, as it should).
    """
    s = os.fspath(name_or_path)
    if not isinstance(s, str) or not s.strip():
        raise InputError(f"pretrained model name or path must be a non-empty string, got {name_or_path!r}")
    if s == EMBEDDED_NAME:
        return str(materialize_tiny_sdxl())
    if s == MINI_NAME:
        if not (WEIGHTS_DIR / "model_index.json").is_file():
            raise MissingInputError(f"the mini SDXL weights are not in {WEIGHTS_DIR}: this install of tsd-lora is "
                                    "incomplete (reinstall it)")
        return str(WEIGHTS_DIR)
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise InputError(f"{p} is a directory but not a diffusers pipeline: it has no model_index.json "
                             f"(save one with pipeline.save_pretrained(dir), or use {EMBEDDED_NAME!r})")
        return str(p)
    if p.exists():
        raise InputError(f"{p} is a file; a diffusers pipeline directory (with model_index.json) or a hub id is "
                         "needed (single-file checkpoints are not supported)")
    if not _HUB_ID.match(s):
        raise InputError(f"{s!r} is neither an existing local directory nor a hub id like 'org/name'")
    return s


# --------------------------------------------------------------------------------------------------------------------
# subject images
# --------------------------------------------------------------------------------------------------------------------

_BACKGROUNDS = [(236, 226, 208), (196, 220, 236), (214, 236, 200), (238, 206, 214), (222, 222, 222),
                (250, 240, 190), (200, 200, 230)]


def _draw_teapot(size: int, rng) -> object:
    """One image of the subject: a teapot with red/white stripes, a gold lid knob, a blue spout and handle, and a
    yellow five-pointed star on its belly, standing on a table line with a soft shadow; random background colour
    (with a vertical gradient), position, scale and facing direction. Drawn at 4x and downsampled (anti-aliasing)."""
    import math

    from PIL import Image, ImageDraw, ImageFilter

    ss = 4
    S = size * ss
    bg = _BACKGROUNDS[rng.randrange(len(_BACKGROUNDS))]
    bg2 = tuple(max(0, c - rng.randint(20, 45)) for c in bg)
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)
    for y in range(S):  # vertical gradient: lighter top, darker bottom
        t = y / (S - 1)
        d.line([(0, y), (S, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(bg, bg2, strict=True)))
    scale = rng.uniform(0.4, 0.6)
    bw, bh = S * scale, S * scale * 0.62  # body ellipse
    facing = rng.choice((-1, 1))  # spout to the right (1) or left (-1)
    # keep the whole teapot in frame: the handle reaches 0.72 bw behind the centre, the spout 0.8 bw ahead
    back, front = 0.72 * bw, 0.8 * bw
    lo, hi = (0.03 * S + back, 0.97 * S - front) if facing == 1 else (0.03 * S + front, 0.97 * S - back)
    cx = rng.uniform(lo, max(lo, hi))
    floor = S * rng.uniform(0.78, 0.9)
    cy = floor - bh / 2
    # table line + shadow
    d.line([(0, floor + S * 0.01), (S, floor + S * 0.01)], fill=tuple(max(0, c - 60) for c in bg2),
           width=max(1, S // 96))
    shadow = Image.new("L", (S, S), 0)
    ImageDraw.Draw(shadow).ellipse([cx - bw * 0.55, floor - bh * 0.06, cx + bw * 0.55, floor + bh * 0.1], fill=110)
    shadow = shadow.filter(ImageFilter.GaussianBlur(S / 60))
    img.paste(Image.new("RGB", (S, S), (40, 40, 40)), (0, 0), shadow)
    d = ImageDraw.Draw(img)
    blue, red, white, gold = (30, 70, 170), (200, 30, 40), (245, 245, 240), (225, 170, 30)
    lw = max(2, int(S * 0.025))
    # handle (behind the body, opposite the spout)
    hx = cx - facing * bw * 0.5
    d.ellipse([hx - bw * 0.22, cy - bh * 0.3, hx + bw * 0.22, cy + bh * 0.3], outline=blue, width=lw * 2)
    # spout: a tapered quadrilateral
    sx0 = cx + facing * bw * 0.38
    d.polygon([(sx0, cy + bh * 0.05), (sx0, cy + bh * 0.3), (sx0 + facing * bw * 0.42, cy - bh * 0.45),
               (sx0 + facing * bw * 0.34, cy - bh * 0.5)], fill=blue)
    # striped body: draw stripes then mask to the ellipse
    body = Image.new("RGB", (S, S), white)
    bd = ImageDraw.Draw(body)
    n_stripes = 7
    top = cy - bh / 2
    for i in range(n_stripes):
        if i % 2 == 0:
            y0 = top + bh * i / n_stripes
            bd.rectangle([0, y0, S, y0 + bh / n_stripes], fill=red)
    mask = Image.new("L", (S, S), 0)
    ImageDraw.Draw(mask).ellipse([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], fill=255)
    img.paste(body, (0, 0), mask)
    d = ImageDraw.Draw(img)
    d.ellipse([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], outline=(90, 20, 25), width=lw)
    # star emblem on the belly
    r_out, r_in = bh * 0.2, bh * 0.08
    pts = []
    for k in range(10):
        ang = -math.pi / 2 + k * math.pi / 5
        r = r_out if k % 2 == 0 else r_in
        pts.append((cx + r * math.cos(ang), cy + bh * 0.05 + r * math.sin(ang)))
    d.polygon(pts, fill=(250, 215, 40), outline=(120, 80, 0))
    # lid + knob
    d.ellipse([cx - bw * 0.22, top - bh * 0.1, cx + bw * 0.22, top + bh * 0.1], fill=blue)
    d.ellipse([cx - bw * 0.06, top - bh * 0.24, cx + bw * 0.06, top - bh * 0.06], fill=gold)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _draw_toy_car(size: int, rng) -> object:
    """One image of the mini SDXL's demo subject: a yellow toy car with a black roof, light-blue windows, big
    black wheels with white hubs and a red stripe along its side, seen from the side on a road, random sky/ground
    colours, position, scale and facing direction. A CIFAR class (automobile) with a look no CIFAR car has."""
    from PIL import Image, ImageDraw

    ss = 4
    S = size * ss
    sky = _BACKGROUNDS[rng.randrange(len(_BACKGROUNDS))]
    ground = tuple(max(0, c - rng.randint(60, 100)) for c in sky)
    horizon = S * rng.uniform(0.55, 0.7)
    img = Image.new("RGB", (S, S), sky)
    d = ImageDraw.Draw(img)
    d.rectangle([0, horizon, S, S], fill=ground)
    scale = rng.uniform(0.7, 0.9)
    w, h = S * scale, S * scale * 0.32  # the body
    facing = rng.choice((-1, 1))
    x0 = rng.uniform(0.04 * S, max(0.04 * S, 0.96 * S - w))
    bottom = min(S * 0.95, horizon + S * rng.uniform(0.12, 0.22))
    top = bottom - h
    yellow, black, glass, red, white = (250, 205, 20), (25, 25, 30), (150, 205, 240), (215, 35, 35), (240, 240, 240)
    d.rounded_rectangle([x0, top, x0 + w, bottom - h * 0.25], radius=h * 0.25, fill=yellow, outline=black,
                        width=max(2, S // 64))
    cab_front, cab_back = (0.62, 0.22) if facing == 1 else (0.38, 0.78)  # the cabin sits toward the back
    cx0, cx1 = sorted((x0 + w * cab_back, x0 + w * cab_front))
    d.polygon([(cx0, top), (cx0 + w * 0.06, top - h * 0.55), (cx1 - w * 0.06, top - h * 0.55), (cx1, top)], fill=black)
    d.polygon([(cx0 + w * 0.05, top - h * 0.05), (cx0 + w * 0.09, top - h * 0.45), (cx1 - w * 0.09, top - h * 0.45),
               (cx1 - w * 0.05, top - h * 0.05)], fill=glass)
    d.rectangle([x0 + w * 0.04, top + h * 0.3, x0 + w * 0.96, top + h * 0.42], fill=red)
    r = h * 0.32
    for fx in (0.2, 0.8):
        wx, wy = x0 + w * fx, bottom - h * 0.25
        d.ellipse([wx - r, wy - r, wx + r, wy + r], fill=black)
        d.ellipse([wx - r * 0.45, wy - r * 0.45, wx + r * 0.45, wy + r * 0.45], fill=white)
    return img.resize((size, size), Image.Resampling.LANCZOS)


#: the subjects :func:`make_subject_images` draws: the tiny SDXL's teapot and the mini SDXL's toy car
SUBJECTS = {"teapot": _draw_teapot, "car": _draw_toy_car}


def make_subject_images(out_dir: str | os.PathLike, n: int = 5, size: int = 96, seed: int = 0,
                        subject: str = "teapot") -> list[Path]:
    """Write ``n`` PNG photos-of-a-subject (``subject_00.png`` ...) the project draws itself (nothing downloaded).

    ``subject`` is one distinctive object of :data:`SUBJECTS`: ``"teapot"`` (red-and-white stripes, blue spout
    and handle, a yellow star; :func:`_draw_teapot`) or ``"car"`` (a yellow toy car; :func:`_draw_toy_car`). Each
    image varies the background colour, position, scale and facing direction, as in a real DreamBooth set.
    Deterministic for ``(n, size, seed, subject)`` (``random.Random(seed)``). Returns the file paths, sorted.
    """
    import random

    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    if subject not in SUBJECTS:
        raise ValueError(f"unknown subject {subject!r}; one of {sorted(SUBJECTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        p = out / f"subject_{i:02d}.png"
        SUBJECTS[subject](size, rng).save(p, format="PNG", optimize=False)
        paths.append(p)
    return paths
