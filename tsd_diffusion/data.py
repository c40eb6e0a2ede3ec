"""DreamBooth data for the SDXL trainer: image loading, start-up validation, SDXL transforms, latent cache keys.

Everything here uses PIL and numpy only (no torchvision: its CPU wheel does not import against the pinned torch).

The transform reproduces ``examples/dreambooth/train_dreambooth_lora_sdxl.py`` of diffusers exactly:

1. ``exif_transpose`` + RGB; ``original_size = (height, width)`` is taken **here**, before any resize;
2. resize so that the **shorter** side equals ``resolution`` (torchvision ``Resize(int)`` semantics: the longer side
   becomes ``int(resolution * long / short)``), LANCZOS by default (the script's ``--image_interpolation_mode``);
3. random horizontal flip of the **resized** image (probability 0.5), **before** the crop;
4. crop ``resolution x resolution``: centre (``top = int(round((H - res) / 2))``, like ``CenterCrop``) or random
   (``top ~ U{0..H-res}``, ``left ~ U{0..W-res}``, like ``RandomCrop.get_params``); ``crop_top_left = (top, left)`` in
   the coordinates of the resized (and, if flipped, already mirrored) image;
5. ``ToTensor`` + ``Normalize([0.5], [0.5])``: CHW float32 in [-1, 1].

Why flip-before-crop and no ``x1 = image.width - x1``: the text-to-image SDXL script used to crop first and then set
``x1 = image.width - x1`` on the *cropped* image, which gives ``resolution - x1`` (not a coordinate of anything;
diffusers issue #6234). diffusers PR #6547 fixed it by flipping before the crop, which the DreamBooth SDXL script does:
the crop coordinates are then simply those of the crop in the image that was actually fed to the model. In the
un-flipped resized frame the same crop starts at ``W - left - resolution``.

Unlike diffusers (which draws the crop/flip once in ``__init__`` and reuses it for the whole run), the dataset here
draws them at ``__getitem__`` time from a random state derived from ``(seed, epoch, kind, index)``, so augmentation
changes per epoch (:meth:`DreamBoothDataset.set_epoch`) and is reproducible, also across DataLoader workers.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import struct
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from shared.errors import InputError

__all__ = [
    "CacheKey",
    "DreamBoothDataset",
    "ImageLoadError",
    "LatentCache",
    "SDXLTransform",
    "TransformParams",
    "collate",
    "compute_time_ids",
    "list_instance_images",
    "load_image",
    "load_mask",
    "mask_sources",
    "read_caption_files",
    "validate_resolution",
]

INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
#: the default extension of caption files beside the images (kohya's ``--caption_extension``)
CAPTION_EXTENSION = ".txt"
#: ``<stem>_mask.<ext>`` beside an image is its loss mask (``--masked_loss``)
MASK_SUFFIX = "_mask"


# --------------------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------------------


def validate_resolution(res: Any) -> int:
    """Return ``res`` when it is a positive multiple of 8 (an int, not a bool), else raise ``ValueError``.

    8 is the SDXL VAE's downsampling factor; the tiny VAE (factor 2) is happy with any multiple of 8 too.
    """
    if isinstance(res, bool) or not isinstance(res, (int, np.integer)):
        raise InputError(f"resolution must be a positive integer multiple of 8, got {res!r} ({type(res).__name__})")
    res = int(res)
    if res <= 0 or res % 8:
        hint = f" (nearest: {max(8, round(res / 8) * 8)})" if res > 0 else ""
        raise InputError(f"resolution must be a positive multiple of 8, got {res}{hint}")
    return res


def _is_hidden(p: Path) -> bool:
    # dotfiles: .DS_Store, AppleDouble "._x.jpg", .ipynb_checkpoints, editor swap files ...
    return p.name.startswith(".")


# --------------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------------


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _high_bit_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit ('I;16*'), 32-bit int ('I') and float ('F') greyscale -> 8-bit RGB by *scaling*, not clipping.

    PIL's own ``convert("RGB")`` clips these at 255, which turns a 16-bit photo almost white.
    'I;16*' is scaled by 1/257 (65535 -> 255). 'I' (PNG 16-bit greyscale on some Pillow versions, also TIFF) is
    treated as 16-bit when its maximum exceeds 255, else as 8-bit. 'F' is treated as [0, 1] when its max is <= 1,
    else as [0, 255].
    """
    a = np.asarray(img)
    if img.mode in _SIXTEEN_BIT:
        a8 = np.round(a.astype(np.float64) / 257.0)
    elif img.mode == "I":
        a = a.astype(np.float64)
        a8 = np.round(a / 257.0) if a.size and a.max() > 255 else a
    else:  # "F"
        a = np.nan_to_num(a.astype(np.float64))
        a8 = np.round(a * 255.0) if a.size and a.max() <= 1.0 else a
    a8 = np.clip(a8, 0, 255).astype(np.uint8)
    return Image.fromarray(a8, mode="L").convert("RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:  # colour-managed conversion when the file carries its CMYK profile
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile: fall back to PIL's plain formula
            pass
    return img.convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_white(img)
        return img.convert("RGB")
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return _high_bit_to_rgb(img)
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode == "LAB":
        from PIL import ImageCms

        return ImageCms.applyTransform(img, ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"))
    return img.convert("RGB")  # "1", "L", "YCbCr", "HSV", "RGBX", ...


class ImageLoadError(InputError):
    """A file could not be used as an image. ``path``, ``reason`` and ``kind`` (``"not_image"``, ``"missing"``,
    ``"unreadable"``, ``"too_large"`` or ``"corrupt"``) are kept separately for messages."""

    def __init__(self, path: Path, reason: str, kind: str = "corrupt"):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.kind = kind


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open a photo as a fully decoded RGB ``PIL.Image``, oriented as a viewer would show it.

    - EXIF orientation is applied (``ImageOps.exif_transpose``), so phone photos come out upright;
    - RGBA / LA / PA / P-with-transparency are composited on white; 16-bit and float greyscale are rescaled to 8 bit;
      CMYK uses the embedded ICC profile when there is one; L / 1 / P / YCbCr / ... are converted to RGB;
    - the whole file is decoded (``img.load()``), so a truncated or corrupt file raises ``ValueError``
      (:class:`ImageLoadError`) naming it. ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed here (a warning
      is issued if someone else set it True, because truncated files then load silently with grey bottoms);
    - multi-frame files (GIF, APNG, TIFF) use their first frame. Any size works (64 px thumbnails to 4096+ px photos;
      PIL's decompression-bomb limit, about 89 Mpx, still applies).
    """
    p = Path(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images will not be detected",
                      stacklevel=2)
    try:
        with Image.open(p) as im:
            im.load()  # force a full decode: raises on truncated / corrupt data
            try:
                oriented = ImageOps.exif_transpose(im)  # a copy (rotated when the EXIF tag asks for it)
            except Exception as e:  # noqa: BLE001 - broken EXIF block: keep the pixels, drop the orientation
                warnings.warn(f"{p}: unreadable EXIF orientation ({type(e).__name__}: {e}); using the image as stored",
                              stacklevel=2)
                oriented = im.copy()
            out = _to_rgb(oriented)
    except FileNotFoundError as e:
        raise ImageLoadError(p, "file does not exist (or is a broken link)", "missing") from e
    except IsADirectoryError as e:
        raise ImageLoadError(p, "is a directory, not an image", "not_image") from e
    except PermissionError as e:
        raise ImageLoadError(p, f"cannot be read ({e.strerror or e})", "unreadable") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(p, "not an image (PIL cannot identify it)", "not_image") from e
    except Image.DecompressionBombError as e:
        raise ImageLoadError(p, f"too large to decode safely ({e})", "too_large") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageLoadError(p, f"corrupt or truncated image ({type(e).__name__}: {e})") from e
    if out.mode != "RGB":  # defensive: every branch above yields RGB
        out = out.convert("RGB")
    return out


# --------------------------------------------------------------------------------------------------------------------
# listing + start-up validation
# --------------------------------------------------------------------------------------------------------------------


def image_candidates(directory: str | os.PathLike, kind: str = "instance", allow_empty: bool = False,
                     caption_extension: str = CAPTION_EXTENSION) -> list[Path]:
    """The files of a data dir that must be images, sorted by name, without decoding them: hidden files,
    ``metadata.jsonl``, caption files (``caption_extension``) and mask files (``<stem>_mask.<ext>`` beside an
    image ``<stem>.<ext>``, :func:`mask_sources`) are left out. With ``allow_empty`` a missing or empty dir gives
    ``[]``."""
    d = Path(directory).expanduser()
    if allow_empty and not d.exists():
        return []
    if not d.exists():
        raise InputError(f"{kind} data dir {d} does not exist")
    if not d.is_dir():
        raise InputError(f"{kind} data dir {d} is not a directory")
    entries = sorted(d.iterdir(), key=lambda p: p.name)
    files = [p for p in entries if not _is_hidden(p) and not p.is_dir()  # (broken links are reported below)
             and p.name != CAPTIONS_FILE and p.suffix.lower() != caption_extension.lower()]
    stems = {p.stem for p in files}
    files = [p for p in files if not (p.stem.endswith(MASK_SUFFIX) and p.stem[:-len(MASK_SUFFIX)] in stems)]
    if not files and not allow_empty:
        subdirs = [p.name for p in entries if not _is_hidden(p) and p.is_dir()]
        extra = f" (sub-folders are not searched: {', '.join(subdirs)})" if subdirs else ""
        raise InputError(f"{kind} data dir {d} contains no images{extra}")
    return files


def _scan_dir(directory: str | os.PathLike, kind: str = "instance", allow_empty: bool = False,
              caption_extension: str = CAPTION_EXTENSION) -> list[tuple[Path, tuple[int, int]]]:
    """Validate a data dir (its images decode, its caption files belong to images and read,
    :func:`read_caption_files`); return ``[(path, (height, width) after EXIF orientation)]`` sorted by file
    name."""
    d = Path(directory).expanduser()
    files = image_candidates(d, kind, allow_empty, caption_extension)
    not_images: list[str] = []
    broken: list[str] = []
    good: list[tuple[Path, tuple[int, int]]] = []
    for f in files:
        try:
            img = load_image(f)
        except ImageLoadError as e:
            if e.kind == "not_image":
                not_images.append(f.name)
            else:
                broken.append(f"{f.name} ({e.reason})")
            continue
        good.append((f, (img.height, img.width)))
    if not_images or broken:
        lines = [f"{kind} data dir {d} has files that are not usable images:"]
        if not_images:
            lines.append(f"  not images: {', '.join(not_images)}")
        if broken:
            lines.append(f"  corrupt, truncated or unreadable: {'; '.join(broken)}")
        lines.append("Remove or fix them (hidden files such as .DS_Store are ignored).")
        raise InputError("\n".join(lines))
    if d.is_dir():
        read_caption_files(d, [p for p, _ in good], caption_extension)
    return good


def read_caption_files(directory: str | os.PathLike, images: list[Path],
                       extension: str = CAPTION_EXTENSION) -> dict[str, str]:
    """Per-image captions of a data dir from caption files beside the images, keyed by image file name: the
    caption of ``photo.jpg`` is ``photo<extension>``; its first non-empty line, stripped (kohya's rule).

    Errors name the file: a caption file whose stem is no image's (a caption without its image), one that is not
    UTF-8 (a BOM is allowed), one without text.
    """
    d = Path(directory).expanduser()
    by_stem: dict[str, list[Path]] = {}
    for p in images:
        by_stem.setdefault(p.stem, []).append(p)
    captions: dict[str, str] = {}
    for f in sorted(d.iterdir(), key=lambda p: p.name):
        if _is_hidden(f) or f.is_dir() or f.suffix.lower() != extension.lower():
            continue
        if f.stem not in by_stem:
            raise InputError(f"caption file {f} has no image: no image named {f.stem}.* in {d} (rename or remove "
                             f"it; --caption_extension {extension!r} marks caption files)")
        try:
            text = f.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InputError(f"caption file {f} is not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                             "UTF-8") from None
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        if not line:
            raise InputError(f"caption file {f} is empty: write the caption of {by_stem[f.stem][0].name} in it "
                             "or remove it (the image then gets metadata.jsonl's caption or the prompt)")
        for image in by_stem[f.stem]:
            captions[image.name] = line
    return captions


def mask_sources(images: list[Path], mask_dir: str | os.PathLike | None = None) -> dict[str, Path | str | None]:
    """Where the loss mask of every image comes from, by image file name (``--masked_loss``), first found of:

    1. a file in ``mask_dir`` with the image's stem (any image format);
    2. ``<stem>_mask.<ext>`` beside the image;
    3. the image's own alpha channel (``"alpha"``);
    4. none (None): the image is weighted 1 everywhere.

    A file of ``mask_dir`` that belongs to no image is an error naming it.
    """
    beside = {}
    for p in images:
        for f in sorted(p.parent.glob(f"{glob.escape(p.stem)}{MASK_SUFFIX}.*")):
            beside.setdefault(p.name, f)
    in_dir: dict[str, Path] = {}
    if mask_dir is not None:
        md = Path(mask_dir).expanduser()
        if not md.is_dir():
            raise InputError(f"--mask_dir {md} is not a directory")
        stems = {p.stem: p for p in images}
        for f in sorted(md.iterdir(), key=lambda p: p.name):
            if _is_hidden(f) or f.is_dir():
                continue
            if f.stem not in stems:
                raise InputError(f"mask {f} in --mask_dir belongs to no image (no {f.stem}.* among the instance "
                                 "images)")
            in_dir.setdefault(stems[f.stem].name, f)
    out: dict[str, Path | str | None] = {}
    for p in images:
        out[p.name] = in_dir.get(p.name) or beside.get(p.name) or ("alpha" if _has_alpha(p) else None)
    return out


def _has_alpha(path: Path) -> bool:
    with Image.open(path) as im:
        return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)


def load_mask(source: Path | str, image_path: Path) -> Image.Image:
    """The loss mask of ``image_path`` from ``source`` (a mask file or ``"alpha"``, :func:`mask_sources`) as an
    8-bit greyscale image oriented like the image (weight = value / 255)."""
    path = image_path if source == "alpha" else Path(source)
    try:
        with Image.open(path) as im:
            im.load()
            oriented = ImageOps.exif_transpose(im)
            if source == "alpha":
                return oriented.convert("RGBA").getchannel("A")
            return oriented.convert("L")
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as e:
        raise InputError(f"mask {path} of {image_path.name}: cannot be read as an image ({type(e).__name__}: "
                         f"{e})") from None


# the Hugging Face ``imagefolder`` convention: {"file_name": ..., "text": ...} per line
CAPTIONS_FILE = "metadata.jsonl"


def read_captions(directory: str | os.PathLike, images: list[Path]) -> dict[str, str]:
    """Per-image captions of a data dir from its ``metadata.jsonl`` (``{}`` without one), keyed by file name.

    Every line must be a JSON object with a string ``file_name`` naming one of ``images`` and a string ``text``;
    errors name the file and line.
    """
    path = Path(directory).expanduser() / CAPTIONS_FILE
    if not path.is_file():
        return {}
    names = {p.name for p in images}
    captions: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n}: not JSON ({e.msg})") from None
        if (not isinstance(row, dict) or not isinstance(row.get("file_name"), str)
                or not isinstance(row.get("text"), str)):
            raise InputError(f"{path} line {n}: needs a string \"file_name\" and a string \"text\"")
        if row["file_name"] not in names:
            raise InputError(f"{path} line {n}: {row['file_name']!r} is not an image of {path.parent}")
        captions[row["file_name"]] = row["text"]
    return captions


def list_instance_images(directory: str | os.PathLike, kind: str = "instance", allow_empty: bool = False,
                         caption_extension: str = CAPTION_EXTENSION) -> list[Path]:
    """The image files of a DreamBooth data dir, sorted by name, after checking that every one decodes.

    Called at start-up, before any model is loaded, so a bad file fails in seconds rather than mid-training.
    Raises ``ValueError`` for a missing dir, a dir without images, and for files that are not images or are corrupt
    or truncated: the message names *every* offending file. Files whose name starts with a dot (``.DS_Store``,
    ``._IMG_1.jpg`` AppleDouble files, ``.ipynb_checkpoints``) are ignored; sub-folders are not searched.
    Whether a file is an image is decided by decoding it, not by its extension. With ``allow_empty`` a missing
    or empty dir gives ``[]`` (a class dir whose images are still to be generated).
    """
    return [p for p, _ in _scan_dir(directory, kind, allow_empty, caption_extension)]


# --------------------------------------------------------------------------------------------------------------------
# transform
# --------------------------------------------------------------------------------------------------------------------


class _Draws:
    """Uniform draws from a ``random.Random``, a ``torch.Generator``, an int seed or (None) the global ``random``."""

    def __init__(self, rng: random.Random | torch.Generator | int | None):
        if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
            rng = random.Random(int(rng))
        self.rng = rng

    def uniform(self) -> float:
        if isinstance(self.rng, torch.Generator):
            return float(torch.rand((), generator=self.rng))
        return (self.rng or random).random()

    def randint(self, lo: int, hi: int) -> int:  # inclusive both ends
        if isinstance(self.rng, torch.Generator):
            return int(torch.randint(lo, hi + 1, (), generator=self.rng))
        return (self.rng or random).randint(lo, hi)


@dataclass(frozen=True)
class TransformParams:
    """What :class:`SDXLTransform` does to one image (all sizes (height, width), coords (top, left))."""

    original_size: tuple[int, int]  # after EXIF orientation, before resize
    resized_size: tuple[int, int]  # after the shorter-side resize
    flipped: bool  # horizontal flip of the resized image, done before the crop
    crop_top_left: tuple[int, int]  # in the resized (and possibly flipped) image
    target_size: tuple[int, int]


class SDXLTransform:
    """Resize (shorter side), optional random h-flip, centre/random crop, to [-1, 1]; see the module docstring.

    ``t(image, rng)`` returns ``(pixel_values CHW float32 in [-1, 1], original_size (h, w),
    crop_top_left (top, left))``.
    ``rng`` is a ``random.Random``, a ``torch.Generator``, an int seed, or None (Python's global ``random``, like the
    diffusers script). Draw order is the script's: the flip coin first (only when ``random_flip``), then the crop
    (only when not ``center_crop``). ``sample_params`` + ``apply`` split this so the augmentation can be known
    (e.g. for a latent-cache key) without touching pixels.
    """

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False,
                 interpolation: str = "lanczos"):
        self.resolution = validate_resolution(resolution)
        self.center_crop = bool(center_crop)
        self.random_flip = bool(random_flip)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        self.interpolation = interpolation

    def __repr__(self) -> str:
        return (f"SDXLTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
                f"random_flip={self.random_flip}, interpolation={self.interpolation!r})")

    def resized_size(self, original_size: tuple[int, int],
                     target_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """The smallest size of the image's aspect ratio that covers ``target_size`` (default: the square of
        ``resolution``). For the square this is torchvision ``Resize(resolution)``: shorter side -> resolution,
        longer side -> int(res * long / short); in general the side whose scale binds gets the target, the
        other int(target * side / binding side)."""
        h, w = original_size
        th, tw = target_size or (self.resolution, self.resolution)
        if th * w >= tw * h:  # th / h >= tw / w: the height binds
            return th, max(tw, int(th * w / h))
        return max(th, int(tw * h / w)), tw

    def sample_params(self, original_size: tuple[int, int], rng=None,
                      target_size: tuple[int, int] | None = None) -> TransformParams:
        """Draw the flip and crop of an image of ``original_size`` for ``target_size`` (height, width; default
        the square of ``resolution``; an aspect-ratio bucket with ``--enable_bucket``)."""
        th, tw = target_size or (self.resolution, self.resolution)
        h, w = self.resized_size(original_size, (th, tw))
        draws = _Draws(rng)
        flipped = bool(self.random_flip and draws.uniform() < 0.5)
        if self.center_crop:
            top = max(0, int(round((h - th) / 2.0)))
            left = max(0, int(round((w - tw) / 2.0)))
        else:
            top = draws.randint(0, h - th)
            left = draws.randint(0, w - tw)
        return TransformParams(tuple(original_size), (h, w), flipped, (top, left), (th, tw))

    def geometry(self, image: Image.Image, params: TransformParams,
                 resample: Image.Resampling | None = None) -> Image.Image:
        """Resize, flip and crop ``image`` as ``params`` say (``resample`` defaults to the interpolation): what
        :meth:`apply` does before the conversion to a tensor, also used for loss masks."""
        if (image.height, image.width) != params.original_size:
            raise ValueError(f"image is {image.height}x{image.width} (h x w) but the params were drawn for "
                             f"{params.original_size[0]}x{params.original_size[1]}")
        h, w = params.resized_size
        if (image.height, image.width) != (h, w):
            image = image.resize((w, h), resample=INTERPOLATIONS[self.interpolation] if resample is None else resample)
        if params.flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top, left = params.crop_top_left
        th, tw = params.target_size
        return image.crop((left, top, left + tw, top + th))

    def apply(self, image: Image.Image, params: TransformParams) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        a = np.asarray(self.geometry(image, params), dtype=np.uint8)
        t = torch.from_numpy(a.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return t.sub_(0.5).div_(0.5)  # torchvision Normalize([0.5], [0.5])

    def apply_mask(self, mask: Image.Image, params: TransformParams) -> torch.Tensor:
        """A greyscale loss mask through the image's geometry (bilinear): 1 x H x W float32 in [0, 1]."""
        a = np.asarray(self.geometry(mask, params, Image.Resampling.BILINEAR), dtype=np.uint8)
        return torch.from_numpy(a.copy()).to(torch.float32).div_(255.0)[None]

    def __call__(self, image: Image.Image, rng=None):
        params = self.sample_params((image.height, image.width), rng)
        return self.apply(image, params), params.original_size, params.crop_top_left


def compute_time_ids(original_size: Sequence[int], crop_top_left: Sequence[int],
                     target_size: int | Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SDXL micro-conditioning: ``original_size + crop_top_left + target_size`` as a 6-vector (the script's
    ``compute_time_ids``; stack per-sample vectors into [B, 6] for ``added_cond_kwargs["time_ids"]``)."""
    if isinstance(target_size, (int, np.integer)):
        target_size = (int(target_size), int(target_size))
    ids = [*original_size, *crop_top_left, *target_size]
    if len(ids) != 6:
        raise ValueError(f"time ids need 2 + 2 + 2 numbers, got {ids}")
    return torch.tensor([float(v) for v in ids], dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# cache key + latent cache
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheKey:
    """Identifies one VAE input exactly: which file version, which transform settings, which crop/flip was applied.

    Hashable (use it as a dict key); ``digest()`` gives a short stable string for file names / logs.
    The VAE itself is not part of the key: a :class:`LatentCache` belongs to one run with one VAE.
    """

    path: str
    file_size: int
    mtime_ns: int
    resolution: int
    center_crop: bool
    random_flip: bool
    interpolation: str
    crop_top_left: tuple[int, int]
    flipped: bool
    target_size: tuple[int, int]  # (height, width): the square of ``resolution`` or an aspect-ratio bucket

    def digest(self) -> str:
        return hashlib.sha1(repr(self).encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return (f"{self.path}@{self.file_size}:{self.mtime_ns}|r{self.resolution}|cc{int(self.center_crop)}"
                f"|rf{int(self.random_flip)}|{self.interpolation}|crop{self.crop_top_left[0]},{self.crop_top_left[1]}"
                f"|flip{int(self.flipped)}|t{self.target_size[0]}x{self.target_size[1]}")


class LatentCache:
    """In-memory ``CacheKey -> latent`` map, so each (image, augmentation) is VAE-encoded once, not once per step.

    The key holds the file's size and mtime, the resolution, ``center_crop``, ``random_flip``, the interpolation and
    the crop/flip actually applied, so a changed file or a changed setting simply misses. :meth:`invalidate_if`
    additionally drops entries made with other settings (to free memory when settings change mid-session).
    Store what the trainer needs; storing ``latent_dist`` parameters (mean/logvar) and sampling per step keeps the
    VAE's sampling noise per step, as diffusers' advanced script does.
    """

    def __init__(self) -> None:
        self._d: dict[CacheKey, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._d

    def get(self, key: CacheKey) -> torch.Tensor | None:
        t = self._d.get(key)
        if t is None:
            self.misses += 1
        else:
            self.hits += 1
        return t

    def put(self, key: CacheKey, latent: torch.Tensor) -> None:
        if not isinstance(key, CacheKey):
            raise TypeError(f"LatentCache keys are CacheKey, got {type(key).__name__}")
        self._d[key] = latent.detach().clone()

    def get_or_compute(self, keys: Sequence[CacheKey], compute) -> torch.Tensor:
        """Latents for a batch: cached ones are reused; ``compute(missing_indices) -> tensor[len(missing), ...]``
        is called once for the rest. Returns the stacked batch in ``keys`` order."""
        found = [self.get(k) for k in keys]
        missing = [i for i, t in enumerate(found) if t is None]
        if missing:
            fresh = compute(missing)
            if len(fresh) != len(missing):
                raise ValueError(f"compute returned {len(fresh)} latents for {len(missing)} missing keys")
            for i, t in zip(missing, fresh, strict=True):
                self.put(keys[i], t)
                found[i] = self._d[keys[i]]
        return torch.stack(found)

    def invalidate_if(self, resolution: int | None = None, center_crop: bool | None = None,
                      random_flip: bool | None = None) -> int:
        """Drop every entry whose settings differ from the given ones (None = don't care); returns how many.

        Lookups with new settings miss anyway, because the key includes them; this only frees the stale entries.
        """
        stale = [k for k in self._d
                 if (resolution is not None and k.resolution != resolution)
                 or (center_crop is not None and k.center_crop != bool(center_crop))
                 or (random_flip is not None and k.random_flip != bool(random_flip))]
        for k in stale:
            del self._d[k]
        return len(stale)

    def invalidate_path(self, path: str | os.PathLike) -> int:
        """Drop every entry of one file (all versions and augmentations); returns how many."""
        p = str(Path(path).expanduser().resolve())
        stale = [k for k in self._d if k.path == p]
        for k in stale:
            del self._d[k]
        return len(stale)

    def clear(self) -> None:
        self._d.clear()
        self.hits = self.misses = 0


# --------------------------------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------------------------------


def collate(batch: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Batch dataset items: instance examples first, then class examples (when present).

    Returns ``pixel_values`` [B, 3, H, W] (None when the items came from :meth:`DreamBoothDataset.plan`),
    ``time_ids`` [B, 6] float32, ``is_class`` bool [B], ``masks`` [B, 1, H, W] (None without masked loss), and
    the lists ``prompts``, ``original_sizes``, ``crop_top_lefts``, ``target_sizes``, ``flipped``, ``cache_keys``,
    ``paths``.
    """
    batch = list(batch)
    if not batch:
        raise ValueError("collate got an empty batch")
    examples = [b for b in batch] + [b["class_example"] for b in batch if "class_example" in b]
    pix = [e["pixel_values"] for e in examples]
    if all(p is None for p in pix):
        pixel_values = None
    elif any(p is None for p in pix):
        raise ValueError("collate: some examples have pixel_values and some do not (mixed plan() and ds[i] items)")
    else:
        pixel_values = torch.stack(pix).contiguous(memory_format=torch.contiguous_format).float()
    return {
        "pixel_values": pixel_values,
        "time_ids": torch.stack([compute_time_ids(e["original_size"], e["crop_top_left"], e["target_size"])
                                 for e in examples]),
        "is_class": torch.tensor([e["is_class"] for e in examples], dtype=torch.bool),
        "prompts": [e["prompt"] for e in examples],
        "original_sizes": [e["original_size"] for e in examples],
        "crop_top_lefts": [e["crop_top_left"] for e in examples],
        "target_sizes": [e["target_size"] for e in examples],
        "flipped": [e["flipped"] for e in examples],
        "cache_keys": [e["cache_key"] for e in examples],
        "paths": [e["path"] for e in examples],
        "masks": (torch.stack([e["mask"] for e in examples]) if examples[0].get("mask") is not None else None),
    }


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (+ optional class images for prior preservation) with per-epoch SDXL augmentation.

    - Start-up: both dirs are validated with :func:`list_instance_images` (every file decoded; errors name the files).
    - Prompts, first found of: a caption file beside the image (:func:`read_caption_files`, ``caption_extension``),
      the dir's ``metadata.jsonl`` (:func:`read_captions`), ``instance_prompt`` or ``class_prompt``. With
      ``prepend_instance_prompt`` an instance image's own caption becomes ``"<instance_prompt> <caption>"``;
      without it the caption is used as written (it should name the subject with the instance token).
      ``caption_dropout_rate`` of the instance examples and ``class_prompt_dropout`` of the class examples get the
      empty prompt, drawn from (seed, epoch, index) like the augmentation.
    - ``buckets`` (:class:`tsd_diffusion.buckets.Buckets`, ``--enable_bucket``): every instance image is cropped to
      its aspect-ratio bucket instead of the square, its class example to the same bucket (a batch holds one
      bucket); :attr:`item_buckets` gives each item's. An image the buckets exclude is an :class:`InputError`.
    - ``masked_loss``: every example also has ``mask``, 1 x H x W in [0, 1] through the image's geometry, from
      :func:`mask_sources` (``mask_dir``, ``<stem>_mask.*``, the alpha channel; else ones; class examples: ones).
      A mask whose size differs from its image's is an :class:`InputError`.
    - ``len``: ``repeats`` × the number of instance images, or ``max(repeats × #instance, #class)`` with a class dir
      (as in diffusers); index ``i`` uses instance image ``i % n_instance`` and class image ``i % n_class``, so each
      repeat of an image gets its own crop and flip.
    - ``ds[i]`` decodes and transforms at call time with a random state derived from ``(seed, epoch, kind, i)``, so
      crops/flips differ between epochs (:meth:`set_epoch`) and are identical for the same (seed, epoch, index).
      It returns the instance example, a dict with ``pixel_values`` [3, H, W] in [-1, 1], ``original_size`` (h, w),
      ``crop_top_left`` (top, left), ``target_size`` (h, w), ``flipped``, ``prompt``, ``is_class`` (False),
      ``cache_key`` (:class:`CacheKey`), ``path``, ``index`` and ``mask`` (None without ``masked_loss``); with a
      class dir it also has ``class_example``, the same dict for the class image (``is_class`` True).
    - :meth:`plan` returns the same dicts without ``pixel_values`` (no decoding). With ``latent_cache`` set (a
      :class:`LatentCache`), ``ds[i]`` skips the decoding of every example whose ``cache_key`` the cache holds: its
      ``pixel_values`` is a NaN placeholder of the right shape, which a consumer that bypassed the cache would
      turn into a NaN loss rather than silently train on.
    - :func:`collate` puts all instance examples first, then all class examples (diffusers' layout, so the loss can be
      split with ``torch.chunk(..., 2)`` or with the ``is_class`` mask).
    """

    def __init__(self, instance_dir: str | os.PathLike, instance_prompt: str, resolution: int = 1024,
                 center_crop: bool = False, random_flip: bool = False, class_dir: str | os.PathLike | None = None,
                 class_prompt: str | None = None, seed: int = 0, interpolation: str = "lanczos",
                 num_class_images: int | None = None, class_prompt_dropout: float = 0.0, repeats: int = 1, *,
                 caption_extension: str = CAPTION_EXTENSION, prepend_instance_prompt: bool = False,
                 caption_dropout_rate: float = 0.0, buckets: Any = None, masked_loss: bool = False,
                 mask_dir: str | os.PathLike | None = None):
        if not isinstance(instance_prompt, str) or not instance_prompt.strip():
            raise InputError("instance_prompt must be a non-empty string (e.g. 'a photo of sks dog')")
        if class_prompt is not None and class_dir is None:
            raise InputError(f"class_prompt={class_prompt!r} needs a class_dir (prior preservation)")
        if class_prompt is not None and (not isinstance(class_prompt, str) or not class_prompt.strip()):
            raise InputError("class_prompt must be a non-empty string (e.g. 'a photo of dog')")
        for name, rate in (("class_prompt_dropout", class_prompt_dropout),
                           ("caption_dropout_rate", caption_dropout_rate)):
            if not 0.0 <= rate < 1.0:
                raise InputError(f"--{name} must be in [0, 1), got {rate}")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise InputError(f"repeats must be an int >= 1, got {repeats!r}")
        if not caption_extension.startswith(".") or len(caption_extension) < 2:
            raise InputError(f"--caption_extension must look like '.txt', got {caption_extension!r}")
        self.class_prompt_dropout = float(class_prompt_dropout)
        self.caption_dropout_rate = float(caption_dropout_rate)
        self.prepend_instance_prompt = bool(prepend_instance_prompt)
        self.transform = SDXLTransform(resolution, center_crop, random_flip, interpolation)
        self.instance_prompt = instance_prompt
        self.class_prompt = class_prompt
        self.seed = int(seed)
        self.epoch = 0
        #: a trainer's :class:`LatentCache` (``--cache_latents`` with in-process loading): ``ds[i]`` then skips
        #: decoding the images whose ``cache_key`` it holds, as kohya's latent cache does
        self.latent_cache: LatentCache | None = None
        self._sizes: dict[tuple[str, int, int], tuple[int, int]] = {}  # (path, size, mtime_ns) -> (h, w)
        scanned = _scan_dir(instance_dir, "instance", caption_extension=caption_extension)
        self.instance_images = self._register(scanned)
        self.instance_captions = {**read_captions(instance_dir, self.instance_images),
                                  **read_caption_files(instance_dir, self.instance_images, caption_extension)}
        self.class_images: list[Path] = []
        self.class_captions: dict[str, str] = {}
        if class_dir is not None:
            class_scanned = _scan_dir(class_dir, "class", caption_extension=caption_extension)
            names = [p for p, _ in class_scanned]  # captions are checked against every image of the dir
            captions = {**read_captions(class_dir, names), **read_caption_files(class_dir, names, caption_extension)}
            if num_class_images is not None:
                if num_class_images < 1:
                    raise InputError(f"num_class_images must be >= 1, got {num_class_images}")
                class_scanned = class_scanned[:num_class_images]
            self.class_images = self._register(class_scanned)
            self.class_captions = {p.name: captions[p.name] for p in self.class_images if p.name in captions}
            uncaptioned = [p.name for p in self.class_images if p.name not in self.class_captions]
            if uncaptioned and class_prompt is None:
                raise InputError(f"class data dir {class_dir}: {len(uncaptioned)} images have no caption in "
                                 f"{CAPTIONS_FILE} and no class_prompt was given (nor a caption file "
                                 f"{caption_extension}; e.g. {', '.join(uncaptioned[:3])})")
        self._length = max(repeats * len(self.instance_images), len(self.class_images))
        self.buckets = buckets
        self.image_buckets = self._assign_buckets(scanned) if buckets is not None else None
        self.masks = self._check_masks(scanned, mask_dir) if masked_loss else None

    def _assign_buckets(self, scanned: list[tuple[Path, tuple[int, int]]]) -> list[tuple[int, int]]:
        assigned = [self.buckets.assign(hw) for _, hw in scanned]
        excluded = [f"{p.name} ({hw[1]}x{hw[0]})" for (p, hw), b in zip(scanned, assigned, strict=True) if b is None]
        if excluded:
            b = self.buckets
            raise InputError(f"--bucket_no_upscale with --min_bucket_reso {b.min_reso}: {len(excluded)} of "
                             f"{len(scanned)} instance images are smaller than the smallest bucket and would be "
                             f"excluded: {', '.join(excluded[:5])}; lower --min_bucket_reso or drop "
                             "--bucket_no_upscale")
        return assigned

    def _check_masks(self, scanned: list[tuple[Path, tuple[int, int]]],
                     mask_dir: str | os.PathLike | None) -> dict[str, Path | str | None]:
        sources = mask_sources([p for p, _ in scanned], mask_dir)
        for p, (h, w) in scanned:
            source = sources[p.name]
            if source is None or source == "alpha":
                continue
            mask = load_mask(source, p)
            if (mask.height, mask.width) != (h, w):
                raise InputError(f"mask {source} is {mask.width}x{mask.height} (w x h) but its image {p.name} is "
                                 f"{w}x{h}: a mask must have its image's size")
        return sources

    @property
    def item_buckets(self) -> list[tuple[int, int]]:
        """The bucket (height, width) of every item (its instance image's), for
        :class:`tsd_diffusion.buckets.BucketBatchSampler`."""
        if self.image_buckets is None:
            raise ValueError("the dataset has no buckets (--enable_bucket)")
        n = len(self.instance_images)
        return [self.image_buckets[i % n] for i in range(self._length)]

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    @property
    def resolution(self) -> int:
        return self.transform.resolution

    @property
    def with_prior_preservation(self) -> bool:
        return bool(self.class_images)

    def _register(self, scanned: list[tuple[Path, tuple[int, int]]]) -> list[Path]:
        out = []
        for p, hw in scanned:
            p = p.resolve()
            st = p.stat()
            self._sizes[(str(p), st.st_size, st.st_mtime_ns)] = hw
            out.append(p)
        return out

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream; call at the start of every epoch (before iterating the DataLoader)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def _rng(self, kind: int, index: int) -> random.Random:
        material = f"tsd-dreambooth:{self.seed}:{self.epoch}:{kind}:{index}".encode()
        return random.Random(int.from_bytes(hashlib.sha256(material).digest()[:8], "little"))

    # -- examples ------------------------------------------------------------------------------------------------
    def _example(self, kind: int, index: int, with_pixels: bool) -> dict[str, Any]:
        files = self.class_images if kind else self.instance_images
        path = files[index % len(files)]
        target = (self.image_buckets[index % len(self.instance_images)] if self.image_buckets is not None
                  else None)
        try:
            st = path.stat()
        except OSError as e:
            raise InputError(f"{path}: cannot read the file any more ({e})") from e
        sig = (str(path), st.st_size, st.st_mtime_ns)
        image = None
        if sig not in self._sizes:
            image = load_image(path)  # the file changed since start-up
            self._sizes[sig] = (image.height, image.width)
        params = self.transform.sample_params(self._sizes[sig], self._rng(kind, index), target)
        t = self.transform
        key = CacheKey(str(path), st.st_size, st.st_mtime_ns, t.resolution, t.center_crop, t.random_flip,
                       t.interpolation, params.crop_top_left, params.flipped, params.target_size)
        pixels = None
        if with_pixels and self.latent_cache is not None and key in self.latent_cache:
            pixels = torch.full((3, *params.target_size), float("nan"))  # never encoded: its latent is cached
        elif with_pixels:
            pixels = t.apply(image if image is not None else load_image(path), params)
        ex: dict[str, Any] = {
            "pixel_values": pixels,
            "original_size": params.original_size,
            "crop_top_left": params.crop_top_left,
            "target_size": params.target_size,
            "flipped": params.flipped,
            "prompt": self._class_prompt(path, index) if kind else self._instance_prompt(path, index),
            "is_class": bool(kind),
            "cache_key": key,
            "path": str(path),
            "index": index,
            "mask": self._mask(kind, path, params) if self.masks is not None and with_pixels else None,
        }
        return ex

    def _mask(self, kind: int, path: Path, params: TransformParams) -> torch.Tensor:
        source = None if kind else self.masks[path.name]
        if source is None:
            return torch.ones(1, *params.target_size)
        return self.transform.apply_mask(load_mask(source, path), params)

    def caption(self, path: Path) -> str:
        """The prompt of an instance image before dropout: its caption (with the instance prompt in front under
        ``prepend_instance_prompt``), else the instance prompt."""
        own = self.instance_captions.get(path.name)
        if own is None:
            return self.instance_prompt
        return f"{self.instance_prompt} {own}" if self.prepend_instance_prompt else own

    def prompts(self) -> list[str]:
        """Every prompt an example can have (the text-embedding cache's set), sorted."""
        out = {self.caption(p) for p in self.instance_images}
        out |= {self.class_captions.get(p.name, self.class_prompt) for p in self.class_images}
        if self.caption_dropout_rate or self.class_prompt_dropout:
            out.add("")
        return sorted(out)

    def _instance_prompt(self, path: Path, index: int) -> str:
        """The image's :meth:`caption`; ``""`` with probability ``caption_dropout_rate``, drawn from (seed, epoch,
        index)."""
        if self.caption_dropout_rate and self._rng(3, index).random() < self.caption_dropout_rate:
            return ""
        return self.caption(path)

    def _class_prompt(self, path: Path, index: int) -> str:
        """The image's caption (else ``class_prompt``); ``""`` (the empty prompt) with probability
        ``class_prompt_dropout``, drawn from (seed, epoch, index) like the augmentation."""
        if self.class_prompt_dropout and self._rng(2, index).random() < self.class_prompt_dropout:
            return ""
        return self.class_captions.get(path.name, self.class_prompt)

    def _item(self, index: int, with_pixels: bool) -> dict[str, Any]:
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for a dataset of {self._length}")
        index %= self._length
        ex = self._example(0, index, with_pixels)
        if self.class_images:
            ex["class_example"] = self._example(1, index, with_pixels)
        return ex

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._item(index, with_pixels=True)

    def plan(self, index: int) -> dict[str, Any]:
        """Like ``ds[index]`` (same crop/flip/cache_key for the current epoch) but without decoding the image."""
        return self._item(index, with_pixels=False)

    collate = staticmethod(collate)
