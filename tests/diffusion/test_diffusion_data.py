"""DreamBooth data pipeline: real-world image files, start-up validation, SDXL transform maths, per-epoch
augmentation, latent-cache keys. Everything is built with PIL in tmp_path, plus the real DreamBooth photos when the
shared data folder is there."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import SHARED_DATA
from tsd_diffusion.data import (
    CacheKey,
    DreamBoothDataset,
    ImageLoadError,
    LatentCache,
    SDXLTransform,
    collate,
    compute_time_ids,
    list_instance_images,
    load_image,
    validate_resolution,
)

DREAMBOOTH = SHARED_DATA / "dreambooth"


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def gradient(h: int, w: int, seed: int = 0) -> Image.Image:
    """An RGB image whose every column and row is distinct, so crops and flips are visible in the pixels."""
    y, x = np.mgrid[0:h, 0:w]
    rs = np.random.RandomState(seed)
    a = np.stack([(x * 255) // max(1, w - 1), (y * 255) // max(1, h - 1), rs.randint(0, 256, (h, w))], -1)
    return Image.fromarray(a.astype(np.uint8), "RGB")


def expected_pixels(img: Image.Image, resized_wh, flip: bool, top: int, left: int, res: int) -> torch.Tensor:
    r = img.resize(resized_wh, Image.Resampling.LANCZOS)
    a = np.asarray(r).astype(np.float32)
    if flip:
        a = a[:, ::-1]
    a = a[top:top + res, left:left + res]
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) / 127.5 - 1


def truncated_jpeg(path: Path) -> Path:
    buf = path.with_suffix(".full.jpg")
    gradient(200, 200, seed=3).save(buf, quality=90)
    data = buf.read_bytes()
    buf.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_subject_dir(d: Path, n: int = 3, size=(96, 160)) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        gradient(size[0], size[1], seed=i).save(d / f"img_{i}.png")
    return d


# ---------------------------------------------------------------------------------------------------------------------
# load_image: real-world files
# ---------------------------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    # stored 120 wide x 60 high: left half red, right half blue; orientation 6 = "rotate 90 deg clockwise to view"
    a = np.zeros((60, 120, 3), np.uint8)
    a[:, :60] = (255, 0, 0)
    a[:, 60:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "phone.jpg"
    Image.fromarray(a).save(p, exif=exif, quality=95)
    assert Image.open(p).size == (120, 60)

    img = load_image(p)
    assert img.mode == "RGB" and img.size == (60, 120)  # width/height swapped
    px = np.asarray(img).astype(int)
    assert px[5, 30, 0] > 200 and px[5, 30, 2] < 60  # the stored left (red) is now the top
    assert px[-5, 30, 2] > 200 and px[-5, 30, 0] < 60  # the stored right (blue) is now the bottom


def test_rgba_la_and_palette_transparency_composite_on_white(tmp_path):
    a = np.zeros((64, 64, 4), np.uint8)
    a[:, :32] = (255, 0, 0, 255)  # opaque red
    a[:, 32:48] = (255, 0, 0, 0)  # fully transparent -> white
    a[:, 48:] = (255, 0, 0, 128)  # half transparent red over white
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    px = np.asarray(load_image(tmp_path / "rgba.png")).astype(int)
    assert tuple(px[10, 10]) == (255, 0, 0)
    assert tuple(px[10, 40]) == (255, 255, 255)
    assert px[10, 56, 0] == 255 and abs(px[10, 56, 1] - 127) <= 2

    la = Image.fromarray(np.stack([np.full((64, 64), 0, np.uint8), np.zeros((64, 64), np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert tuple(np.asarray(load_image(tmp_path / "la.png"))[0, 0]) == (255, 255, 255)  # black but transparent

    p = Image.new("P", (64, 64), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 1
    p.save(tmp_path / "pal.png", transparency=1)
    assert tuple(np.asarray(load_image(tmp_path / "pal.png"))[0, 0]) == (255, 255, 255)


def test_grayscale_cmyk_and_16bit(tmp_path):
    Image.fromarray(np.full((64, 80), 77, np.uint8), "L").save(tmp_path / "gray.png")
    g = load_image(tmp_path / "gray.png")
    assert g.mode == "RGB" and g.size == (80, 64) and tuple(np.asarray(g)[3, 3]) == (77, 77, 77)

    cmyk = Image.new("CMYK", (80, 64), (0, 0, 0, 0))  # white
    cmyk.paste((0, 255, 255, 0), (0, 0, 40, 64))  # left half: no cyan, full magenta + yellow = red
    cmyk.save(tmp_path / "print.jpg", quality=95)
    assert Image.open(tmp_path / "print.jpg").mode == "CMYK"
    c = np.asarray(load_image(tmp_path / "print.jpg")).astype(int)
    assert c[32, 10, 0] > 230 and c[32, 10, 1] < 30 and c[32, 10, 2] < 30
    assert (c[32, 70] > 230).all()

    a16 = np.zeros((64, 64), np.uint16)
    a16[:, :16] = 65535
    a16[:, 16:32] = 32896  # 128 * 257
    a16[:, 32:48] = 30000  # -> 117; PIL's own convert("RGB") would clip this to 255
    Image.fromarray(a16).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    s = np.asarray(load_image(tmp_path / "sixteen.png"))
    assert s.dtype == np.uint8
    assert tuple(s[0, [0, 20, 40, 60], 0]) == (255, 128, 117, 0)


def test_extreme_and_small_sizes(tmp_path):
    gradient(64, 4096).save(tmp_path / "panorama.png")
    gradient(64, 64).save(tmp_path / "thumb.png")
    assert load_image(tmp_path / "panorama.png").size == (4096, 64)
    assert load_image(tmp_path / "thumb.png").size == (64, 64)
    t = SDXLTransform(64, center_crop=True)
    pix, orig, crop = t(load_image(tmp_path / "panorama.png"))
    assert pix.shape == (3, 64, 64) and orig == (64, 4096) and crop == (0, (4096 - 64) // 2)
    pix, orig, crop = t(load_image(tmp_path / "thumb.png"))
    assert pix.shape == (3, 64, 64) and orig == (64, 64) and crop == (0, 0)


def test_truncated_and_non_image_files_raise_naming_the_file(tmp_path):
    bad = truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(ValueError, match=r"cut\.jpg.*(truncated|corrupt)"):
        load_image(bad)
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ValueError, match=r"notes\.txt: not an image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(ImageLoadError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------------------------------------------------
# list_instance_images: start-up validation
# ---------------------------------------------------------------------------------------------------------------------


def test_list_instance_images_sorted_and_ignores_hidden(tmp_path):
    d = write_subject_dir(tmp_path / "subj", n=3)
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (d / "._img_0.png").write_bytes(b"AppleDouble junk")
    (d / "sub").mkdir()
    gradient(64, 64).save(d / "no_extension", format="PNG")  # decided by content, not by extension
    names = [p.name for p in list_instance_images(d)]
    assert names == ["img_0.png", "img_1.png", "img_2.png", "no_extension"]


def test_list_instance_images_missing_and_empty_dirs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        list_instance_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        list_instance_images(tmp_path / "empty")
    only_hidden = tmp_path / "hidden"
    only_hidden.mkdir()
    (only_hidden / ".DS_Store").write_bytes(b"x")
    (only_hidden / "nested").mkdir()
    with pytest.raises(ValueError, match=r"contains no images \(sub-folders are not searched: nested\)"):
        list_instance_images(only_hidden)
    f = tmp_path / "file.png"
    gradient(8, 8).save(f)
    with pytest.raises(ValueError, match="not a directory"):
        list_instance_images(f)


def test_list_instance_images_names_every_bad_file(tmp_path):
    d = write_subject_dir(tmp_path / "subj", n=2)
    truncated_jpeg(d / "broken.jpg")
    (d / "captions.doc").write_text("a photo of sks dog")  # (.txt files are caption files: tested below)
    (d / "readme.md").write_text("# hi")
    (d / "fake.png").write_text("this is text with a .png name")
    (d / "zero.jpg").write_bytes(b"")
    (d / "link.jpg").symlink_to(d / "gone.jpg")  # a dangling link
    with pytest.raises(ValueError) as ei:
        list_instance_images(d)
    msg = str(ei.value)
    for name in ("broken.jpg", "captions.doc", "readme.md", "fake.png", "zero.jpg", "link.jpg"):
        assert name in msg
    assert "img_0.png" not in msg and "img_1.png" not in msg
    assert "not images: captions.doc, fake.png, readme.md, zero.jpg" in msg
    assert "broken.jpg (corrupt or truncated image" in msg and "link.jpg (file does not exist" in msg
    # the dataset validates at construction, before any training
    with pytest.raises(ValueError, match="broken.jpg"):
        DreamBoothDataset(d, "a photo of sks dog", 64)


# ---------------------------------------------------------------------------------------------------------------------
# transform + time ids: hand-computed
# ---------------------------------------------------------------------------------------------------------------------


def test_validate_resolution():
    assert validate_resolution(64) == 64 and validate_resolution(np.int64(1024)) == 1024
    for bad in (0, -8, 60, 1023, 64.0, True, "64", None):
        with pytest.raises(ValueError, match="multiple of 8"):
            validate_resolution(bad)


def test_center_crop_sizes_and_time_ids():
    img = gradient(100, 200)  # h=100, w=200
    t = SDXLTransform(64, center_crop=True, random_flip=False)
    pix, orig, crop = t(img)
    # shorter side 100 -> 64; longer 200 -> int(64 * 200 / 100) = 128; centre: left = round((128 - 64) / 2) = 32
    assert orig == (100, 200) and crop == (0, 32)
    assert torch.allclose(pix, expected_pixels(img, (128, 64), False, 0, 32, 64), atol=1e-5)
    assert pix.dtype == torch.float32 and pix.min() >= -1 and pix.max() <= 1
    assert compute_time_ids(orig, crop, 64).tolist() == [100, 200, 0, 32, 64, 64]
    assert compute_time_ids((3, 4), (5, 6), (7, 8), dtype=torch.float16).dtype == torch.float16

    # tall: (300, 150) -> (128, 64), top = 32
    _, orig, crop = t(gradient(300, 150))
    assert orig == (300, 150) and crop == (32, 0)
    # torchvision truncation: w = int(64 * 101 / 100) = 64 -> no room to crop
    _, orig, crop = t(gradient(100, 101))
    assert crop == (0, 0)
    # round-half-to-even like CenterCrop: (67 - 64) / 2 = 1.5 -> 2
    _, _, crop = t(gradient(64, 67))
    assert crop == (0, 2)


def test_random_crop_and_flip_match_a_hand_replay():
    img = gradient(100, 200, seed=5)
    t = SDXLTransform(64, center_crop=False, random_flip=True)
    seen_flip = set()
    for seed in range(12):
        pix, orig, crop = t(img, random.Random(seed))
        replay = random.Random(seed)  # the draw order: flip coin first, then top, then left
        flip = replay.random() < 0.5
        top, left = replay.randint(0, 64 - 64), replay.randint(0, 128 - 64)
        assert orig == (100, 200) and crop == (top, left)
        # flip happens on the resized image before the crop: crop coords are in the flipped frame (diffusers #6547)
        assert torch.allclose(pix, expected_pixels(img, (128, 64), flip, top, left, 64), atol=1e-5)
        assert compute_time_ids(orig, crop, 64).tolist() == [100, 200, top, left, 64, 64]
        seen_flip.add(flip)
    assert seen_flip == {True, False}

    # in the un-flipped frame the same crop starts at W - left - res: check on a flipped case
    params = next(p for s in range(50) if (p := t.sample_params((100, 200), random.Random(s))).flipped)
    out = t.apply(img, params)
    top, left = params.crop_top_left
    unflipped_left = 128 - left - 64
    ref = expected_pixels(img, (128, 64), False, top, unflipped_left, 64).flip(-1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_torch_generator_and_int_seed_are_deterministic():
    img = gradient(90, 170)
    t = SDXLTransform(64, center_crop=False, random_flip=True)
    a = t(img, torch.Generator().manual_seed(3))
    b = t(img, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert t(img, 7)[2] == t(img, 7)[2]
    with pytest.raises(ValueError, match="interpolation"):
        SDXLTransform(64, interpolation="cubic-ish")


# ---------------------------------------------------------------------------------------------------------------------
# dataset: per-epoch augmentation, cache keys, collate
# ---------------------------------------------------------------------------------------------------------------------


def aug_of(ds, epoch):
    ds.set_epoch(epoch)
    return [(ds[i]["crop_top_left"], ds[i]["flipped"]) for i in range(len(ds))]


def test_augmentation_differs_between_epochs_and_replays_exactly(tmp_path):
    d = write_subject_dir(tmp_path / "subj", n=3)
    ds = DreamBoothDataset(d, "a photo of sks dog", 64, center_crop=False, random_flip=True, seed=1)
    e0, e1, e2 = aug_of(ds, 0), aug_of(ds, 1), aug_of(ds, 2)
    assert e0 != e1 or e1 != e2
    assert aug_of(ds, 0) == e0  # back to epoch 0: the same augmentation

    twin = DreamBoothDataset(d, "a photo of sks dog", 64, center_crop=False, random_flip=True, seed=1)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        twin.set_epoch(epoch)
        for i in range(len(ds)):
            a, b = ds[i], twin[i]
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["cache_key"] == b["cache_key"]
    other_seed = DreamBoothDataset(d, "a photo of sks dog", 64, center_crop=False, random_flip=True, seed=2)
    assert [aug_of(other_seed, e) for e in range(3)] != [e0, e1, e2]

    ds.set_epoch(0)
    pix = [ds[i]["pixel_values"] for i in range(3)]
    ds.set_epoch(1)
    assert any(not torch.equal(p, ds[i]["pixel_values"]) for i, p in enumerate(pix))
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)


def test_item_fields_and_plan(tmp_path):
    d = write_subject_dir(tmp_path / "subj", n=2)
    ds = DreamBoothDataset(d, "a photo of sks dog", 64, center_crop=False, random_flip=True, seed=0)
    ds.set_epoch(3)
    item = ds[1]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["original_size"] == (96, 160) and item["target_size"] == (64, 64)
    assert item["prompt"] == "a photo of sks dog" and item["is_class"] is False
    assert item["path"].endswith("img_1.png")
    key = item["cache_key"]
    assert isinstance(key, CacheKey) and key.crop_top_left == item["crop_top_left"] and key.flipped == item["flipped"]
    assert key.resolution == 64 and len(key.digest()) == 16 and "img_1.png" in str(key)
    plan = ds.plan(1)
    assert plan["pixel_values"] is None
    assert ({k: v for k, v in plan.items() if k != "pixel_values"}
            == {k: v for k, v in item.items() if k != "pixel_values"})
    with pytest.raises(IndexError):
        ds[2]


def test_cache_keys_follow_settings_not_epochs(tmp_path):
    d = write_subject_dir(tmp_path / "subj", n=2)

    def keys(epoch=0, **kw):
        args = dict(resolution=64, center_crop=True, random_flip=False) | kw
        ds = DreamBoothDataset(d, "a photo of sks dog", seed=0, **args)
        ds.set_epoch(epoch)
        return [ds.plan(i)["cache_key"] for i in range(len(ds))]

    base = keys()
    assert keys(epoch=1) == base == keys(epoch=7)  # no random augmentation: same latents every epoch
    assert set(keys(resolution=72)).isdisjoint(base)
    assert set(keys(center_crop=False)).isdisjoint(base)  # (96x160 -> 64x106: the random crop is not central...)
    assert set(keys(random_flip=True)).isdisjoint(base)
    assert set(keys(interpolation="bicubic")).isdisjoint(base)

    # with random augmentation the key follows the crop/flip actually drawn
    rnd = [keys(epoch=e, center_crop=False, random_flip=True) for e in range(4)]
    assert len({k for ks in rnd for k in ks}) > len(base)

    # editing a file changes its key (size / mtime)
    p = d / "img_0.png"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    after = keys()
    assert after[0] != base[0] and after[1] == base[1]


def test_latent_cache_encodes_each_augmentation_once(tmp_path):
    d = write_subject_dir(tmp_path / "subj", n=3)
    ds = DreamBoothDataset(d, "a photo of sks dog", 64, center_crop=True, random_flip=False)
    cache = LatentCache()
    encoded = []

    def run_epoch(epoch):
        ds.set_epoch(epoch)
        batch = collate([ds[i] for i in range(len(ds))])

        def encode(idx):
            encoded.extend(batch["cache_keys"][i] for i in idx)
            return batch["pixel_values"][idx][:, :, ::8, ::8].clone()  # stand-in for vae.encode

        return cache.get_or_compute(batch["cache_keys"], encode)

    first = run_epoch(0)
    second = run_epoch(1)
    assert len(encoded) == 3 and len(cache) == 3 and torch.equal(first, second)
    assert cache.hits == 3 and cache.misses == 3

    assert cache.invalidate_if(resolution=64, center_crop=True, random_flip=False) == 0
    assert cache.invalidate_if(resolution=72) == 3 and len(cache) == 0
    run_epoch(2)
    assert cache.invalidate_path(d / "img_1.png") == 1 and len(cache) == 2
    with pytest.raises(TypeError):
        cache.put("img_0.png", torch.zeros(1))


def test_prior_preservation_collate_layout(tmp_path):
    inst = write_subject_dir(tmp_path / "inst", n=2)
    cls = write_subject_dir(tmp_path / "cls", n=5, size=(80, 80))
    ds = DreamBoothDataset(inst, "a photo of sks dog", 64, class_dir=cls, class_prompt="a photo of dog",
                           random_flip=True)
    assert len(ds) == 5 and ds.with_prior_preservation
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["is_class"].tolist() == [False, False, True, True]
    assert batch["prompts"] == ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2
    assert batch["time_ids"].shape == (4, 6) and batch["time_ids"].dtype == torch.float32
    assert batch["time_ids"][2].tolist()[:2] == [80, 80] and batch["time_ids"][0].tolist()[:2] == [96, 160]
    for row, o, c in zip(batch["time_ids"], batch["original_sizes"], batch["crop_top_lefts"], strict=True):
        assert row.tolist() == [*o, *c, 64, 64]
    assert ds.collate is collate

    with pytest.raises(ValueError, match="5 images have no caption in metadata.jsonl and no class_prompt"):
        DreamBoothDataset(inst, "a photo of sks dog", 64, class_dir=cls)
    with pytest.raises(ValueError, match="needs a class_dir"):
        DreamBoothDataset(inst, "a photo of sks dog", 64, class_prompt="a photo of dog")
    with pytest.raises(ValueError, match="instance_prompt"):
        DreamBoothDataset(inst, "  ", 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        DreamBoothDataset(inst, "a photo of sks dog", 100)
    with pytest.raises(ValueError, match="class data dir .* does not exist"):
        DreamBoothDataset(inst, "a photo of sks dog", 64, class_dir=tmp_path / "nope", class_prompt="a dog")


def test_repeats_multiply_the_instance_epoch(tmp_path):
    """--repeats (diffusers): every instance image comes `repeats` times per epoch, each copy with its own crop and
    flip; with a class dir the epoch is max(repeats x #instance, #class)."""
    inst = write_subject_dir(tmp_path / "inst", n=2)
    cls = write_subject_dir(tmp_path / "cls", n=5, size=(80, 80))
    ds = DreamBoothDataset(inst, "a photo of sks dog", 64, random_flip=True, repeats=3, seed=1)
    assert len(ds) == 6
    plans = [ds.plan(i) for i in range(6)]
    assert [Path(p["path"]).name for p in plans] == [Path(plans[0]["path"]).name, Path(plans[1]["path"]).name] * 3
    assert len({(p["path"], p["crop_top_left"], p["flipped"]) for p in plans}) > 2  # copies are augmented apart
    with_prior = DreamBoothDataset(inst, "a photo of sks dog", 64, class_dir=cls, class_prompt="a dog", repeats=4)
    assert len(with_prior) == 8 and [Path(with_prior.plan(i)["class_example"]["path"]).name for i in (0, 5)] == \
        [Path(with_prior.plan(0)["class_example"]["path"]).name] * 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="repeats must be an int >= 1"):
            DreamBoothDataset(inst, "a photo of sks dog", 64, repeats=bad)


def test_instance_captions_from_metadata_jsonl(tmp_path):
    """Instance photos may carry their own captions too (imagefolder's metadata.jsonl); the rest get
    instance_prompt. Before, the file was skipped as a non-image and its captions silently ignored."""
    inst = write_subject_dir(tmp_path / "inst", n=3)
    names = sorted(p.name for p in inst.iterdir())
    (inst / "metadata.jsonl").write_text(json.dumps({"file_name": names[1], "text": "sks dog on a beach"}) + "\n")
    ds = DreamBoothDataset(inst, "a photo of sks dog", 32)
    assert len(ds) == 3
    assert [ds.plan(i)["prompt"] for i in range(3)] == ["a photo of sks dog", "sks dog on a beach",
                                                        "a photo of sks dog"]
    assert ds[1]["prompt"] == "sks dog on a beach"
    (inst / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="'gone.png' is not an image"):
        DreamBoothDataset(inst, "a photo of sks dog", 32)


def test_replay_prior_captions_and_prompt_dropout(tmp_path):
    """A class dir with metadata.jsonl (Hugging Face imagefolder) gives every prior image its own caption; images
    without one fall back to class_prompt; class_prompt_dropout swaps in the empty prompt, the same for the same
    (seed, epoch, index) and redrawn per epoch."""
    inst = write_subject_dir(tmp_path / "inst", n=2)
    cls = write_subject_dir(tmp_path / "cls", n=6, size=(40, 40))
    names = sorted(p.name for p in cls.iterdir())
    rows = [{"file_name": n, "text": f"a photo of a thing {i}"} for i, n in enumerate(names[:5])]
    (cls / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = DreamBoothDataset(inst, "a photo of sks dog", 32, class_dir=cls, class_prompt="a photo of a thing")
    assert len(ds.class_images) == 6  # metadata.jsonl is not an image
    assert ([ds.plan(i)["class_example"]["prompt"] for i in range(6)]
            == [r["text"] for r in rows] + ["a photo of a thing"])
    with pytest.raises(ValueError, match="1 images have no caption"):
        DreamBoothDataset(inst, "a photo of sks dog", 32, class_dir=cls)

    ds = DreamBoothDataset(inst, "a photo of sks dog", 32, class_dir=cls, class_prompt="x", class_prompt_dropout=0.5)
    seen = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        prompts = [ds.plan(i)["class_example"]["prompt"] for i in range(6)]
        assert prompts == [ds.plan(i)["class_example"]["prompt"] for i in range(6)]  # deterministic
        assert ds.plan(0)["prompt"] == "a photo of sks dog"  # instance prompts are never dropped
        seen.append(prompts)
    flat = [p for ps in seen for p in ps]
    assert 0 < flat.count("") < len(flat) and seen[0] != seen[1]

    for bad, match in [("not json", "line 1: not JSON"),
                       ('{"file_name": "nope.png", "text": "a"}', "'nope.png' is not an image"),
                       (f'{{"file_name": "{names[0]}"}}', "line 1: needs a string")]:
        (cls / "metadata.jsonl").write_text(bad + "\n")
        with pytest.raises(ValueError, match=match):
            DreamBoothDataset(inst, "a photo of sks dog", 32, class_dir=cls, class_prompt="x")
    with pytest.raises(ValueError, match="class_prompt_dropout"):
        DreamBoothDataset(inst, "a photo of sks dog", 32, class_dir=cls, class_prompt="x", class_prompt_dropout=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# the real DreamBooth photos
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason=f"real DreamBooth photos not found at {DREAMBOOTH} "
                    "(the shared data folder beside the repository)")
def test_real_dreambooth_photos_list_load_and_transform():
    subjects = sorted(p for p in DREAMBOOTH.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert subjects, f"no subject folders in {DREAMBOOTH}"
    for subj in subjects:
        files = list_instance_images(subj)
        assert len(files) >= 3, subj
        ds = DreamBoothDataset(subj, f"a photo of sks {subj.name}", 64, center_crop=False, random_flip=True)
        for i in range(len(ds)):
            item = ds[i]
            pix = item["pixel_values"]
            assert pix.shape == (3, 64, 64) and pix.min() >= -1 and pix.max() <= 1
            assert pix.std() > 0.02, f"{item['path']} came out flat"
            h, w = item["original_size"]
            assert min(h, w) >= 64
            top, left = item["crop_top_left"]
            rh, rw = ds.transform.resized_size((h, w))
            assert 0 <= top <= rh - 64 and 0 <= left <= rw - 64
