"""The mini SDXL: a 32x32 pipeline of the real SDXL architecture, pretrained on CIFAR-10 on a CPU by
``scripts/pretrain_mini_sdxl.py`` (:mod:`tsd_diffusion.pretrain_mini`) and shipped complete with the package
(``weights/mini-sdxl``; see
``docs/mini_sdxl.md``).

Every component is a stock class, loaded through ``StableDiffusionXLPipeline.from_pretrained(WEIGHTS_DIR)``:

- ``unet``: ``UNet2DConditionModel`` (4.0 M params), ``addition_embed_type="text_time"``, blocks (64, 128), one
  cross-attention level with ``to_q/to_k/to_v/to_out.0``, latents 16x16x4;
- ``vae``: ``AutoencoderKL`` (0.66 M), 32x32x3 <-> 16x16x4, per-channel ``latents_mean``/``latents_std`` in its
  config (the pipeline de-normalises with them before decoding; :func:`encode_latents` is the inverse);
- ``text_encoder``/``text_encoder_2``: ``CLIPTextModel``/``CLIPTextModelWithProjection`` (hidden 32, 2 layers),
  random and frozen, token embeddings rescaled to std 1 (CLIP's 0.02 init leaves the cross-attention context ~50x
  smaller than the UNet's activations);
- ``tokenizer``/``tokenizer_2``: the real CLIP BPE (49 408 tokens, MIT, from open_clip's
  ``bpe_simple_vocab_16e6.txt.gz``), the second padding with ``"!"`` as SDXL's does.

Beside the pipeline ship two sets of the base's own generations (:func:`sample_class_set`, written by
``scripts/sample_mini_sdxl.py``), so the default DreamBooth run needs no download:
:data:`REPLAY_PRIOR_FILE` (the replay prior, captioned like the pretraining data) and :data:`REFERENCE_FILE` (the
subject metrics' gallery of non-subject images). The CIFAR-10 images the base was pretrained on are not shipped.
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
# package data written by the pretraining script
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "mini-sdxl"
EVALUATION_DIR = "evaluation"  # the CIFAR classifier shipped with the weights (tsd_diffusion.evaluation)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CAPTION_TEMPLATES = ("a photo of a {}", "a {}", "a picture of a {}", "a photo of the {}")
RESOLUTION = 32
TIME_IDS = (RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION)  # original size, crop top-left, target size
TRAIN_PER_CLASS = 900
CIFAR_MEMBER = "cifar10_classification/base64/task.json"
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")
REPLAY_PRIOR_FILE = "replay_prior.safetensors"  # in WEIGHTS_DIR
REFERENCE_FILE = f"{EVALUATION_DIR}/reference_images.safetensors"  # in WEIGHTS_DIR
SAMPLE_STEPS = 30  # Euler steps, as the pretraining evaluation
#: the shipped sample sets, as ``scripts/sample_mini_sdxl.py`` draws them with :func:`sample_class_set`: file in the
#: weights dir -> (seed, captions from the pretraining templates, guidance). The replay prior is unguided, the base's
#: own conditional distribution, which it then trains towards without moving (guided samples, sharper than that,
#: pulled other classes away: a dog prompt drew dogs 6-25 % of the time after the default run instead of 31-75 %);
#: the gallery is drawn at the pipeline's default guidance 5, as validation generates.
SAMPLE_SETS = {REPLAY_PRIOR_FILE: (1, True, 1.0), REFERENCE_FILE: (2, False, 5.0)}

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


def load_cifar(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All 10 000 images (uint8, N x 32 x 32 x 3) and labels from BIG-bench's CIFAR-10 task file
    (:data:`CIFAR_MEMBER` of the ``bigbench==1.0.0`` sdist, which the package index no longer serves)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: it is {CIFAR_MEMBER} of a BIG-bench 1.0.0 copy")
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



def load_tokenizers(pipeline_dir: str | Path = WEIGHTS_DIR) -> tuple[Any, Any]:
    """The two CLIP tokenizers of a pipeline dir (the mini SDXL's by default: the real CLIP BPE, 49 408 tokens;
    the second pads with ``"!"`` as SDXL's does)."""
    from transformers import CLIPTokenizer

    return tuple(CLIPTokenizer.from_pretrained(str(Path(pipeline_dir) / sub)) for sub in TOKENIZER_DIRS)


def copy_tokenizers(pipeline_dir: str | Path) -> None:
    """Put the shipped ``tokenizer/`` and ``tokenizer_2/`` into a pipeline dir saved without them."""
    import shutil

    for sub in TOKENIZER_DIRS:
        if (Path(pipeline_dir) / sub).resolve() != (WEIGHTS_DIR / sub).resolve():
            shutil.copytree(WEIGHTS_DIR / sub, Path(pipeline_dir) / sub, dirs_exist_ok=True)


# ------------------------------------------------------------------------------------ samples of the base itself
def caption(k: int, class_index: int) -> str:
    """The ``k``-th caption of a class: :data:`CAPTION_TEMPLATES` cycled, as in pretraining."""
    return CAPTION_TEMPLATES[k % len(CAPTION_TEMPLATES)].format(CLASSES[class_index])


@torch.no_grad()
def sample_class_set(pipe: Any, per_class: int, seed: int, *, templates: bool, guidance: float,
                     batch_size: int = 100, progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``per_class`` generations of every class from ``pipe`` (uint8 N x 32 x 32 x 3, labels, captions).

    Item ``i`` is class ``i % 10`` (so any prefix cycles through the classes), prompted with :func:`caption`
    ``(i // 10, class)`` when ``templates`` else ``"a photo of a {class}"``, and drawn from its own generator
    seeded ``seed * 1_000_003 + i`` (classifier-free ``guidance``, :data:`SAMPLE_STEPS` Euler steps): an image does not
    depend on the batch it was drawn in.
    """
    from tqdm.auto import tqdm

    n = per_class * len(CLASSES)
    labels = np.arange(n) % len(CLASSES)
    captions = [caption(i // len(CLASSES) if templates else 0, int(c)) for i, c in enumerate(labels)]
    images = []
    for start in tqdm(range(0, n, batch_size), desc="sampling the mini SDXL", disable=not progress):
        idx = range(start, min(n, start + batch_size))
        out = pipe([captions[i] for i in idx], generator=[torch.Generator("cpu").manual_seed(seed * 1_000_003 + i)
                                                          for i in idx],
                   num_inference_steps=SAMPLE_STEPS, guidance_scale=guidance, height=RESOLUTION,
                   width=RESOLUTION, output_type="pt").images
        images.append(to_uint8(out.float().cpu() * 2 - 1))
    return np.concatenate(images), labels.astype(np.int64), captions


def save_class_set(path: str | Path, images: np.ndarray, labels: np.ndarray, captions: list[str],
                   **info: Any) -> None:
    """uint8 images and int64 labels as safetensors tensors; captions and ``info`` as JSON in its metadata."""
    from shared.io import save_safetensors

    save_safetensors({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}, Path(path),
                     metadata={"captions": json.dumps(captions), "info": json.dumps(info)})


def load_class_set(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A file of :func:`save_class_set`: images (uint8 N x 32 x 32 x 3), labels, captions."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        captions = json.loads(f.metadata()["captions"])
        return f.get_tensor("images"), f.get_tensor("labels"), captions


def materialize_replay_prior(per_class: int = 100, cache_dir: str | Path | None = None) -> Path:
    """A captioned class-image dir for DreamBooth's prior term on the mini SDXL: the first ``per_class`` images
    of every class of the shipped :data:`REPLAY_PRIOR_FILE` (generations of the base itself, captions from
    :data:`CAPTION_TEMPLATES` cycled as in pretraining) as PNGs with ``metadata.jsonl``. With
    ``--class_prompt_dropout 0.1`` this keeps every class and the unconditional branch near the base (the study's
    "replay prior"). Written once into ``<cache>/mini-sdxl-replay-<hash>-<per_class>/images/``; the files are
    named ``<k>_<class>.png`` so that the sorted order (what ``--num_class_images`` cuts) cycles through the
    classes. Needs no network."""
    import hashlib

    from PIL import Image

    from tsd_common.cache import build_cached_dir
    from tsd_common.cache import cache_dir as default_cache_dir

    source = WEIGHTS_DIR / REPLAY_PRIOR_FILE
    images, labels, captions = load_class_set(source)
    have = int(torch.bincount(labels, minlength=len(CLASSES)).min())
    if not 1 <= per_class <= have:
        raise ValueError(f"per_class must be in [1, {have}] (what {source.name} holds), got {per_class}")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    root = Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir()

    def build(out: Path, _: Path) -> None:
        rows = []
        (out / "images").mkdir()
        for c, name in enumerate(CLASSES):
            for k, i in enumerate(torch.nonzero(labels == c).flatten()[:per_class].tolist()):
                file = f"{k:04d}_{name}.png"
                Image.fromarray(images[i].numpy()).save(out / "images" / file)
                rows.append(json.dumps({"file_name": file, "text": captions[i]}))
        (out / "images" / "metadata.jsonl").write_text("\n".join(rows) + "\n")

    final = root / f"mini-sdxl-replay-{digest}-{per_class}"
    return build_cached_dir(final, build, {"name": "mini-sdxl-replay", "per_class": per_class}) / "images"


def reference_images(pipeline_dir: str | Path = WEIGHTS_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference set a mini SDXL dir ships (:data:`REFERENCE_FILE`: generations of the base, 100 per class,
    seeds disjoint from the replay prior's, never trained on) in [-1, 1] and their labels: the non-subject gallery
    of the subject metrics (:mod:`tsd_diffusion.evaluation`)."""
    images, labels, _ = load_class_set(Path(pipeline_dir) / REFERENCE_FILE)
    return to_tensor(images.numpy()), labels
