"""Aspect-ratio bucketing (``--enable_bucket``): bucket sizes and assignment against brute force, the seeded
schedule (deterministic, one bucket per batch, sharded across processes), and the trainer on a folder of portrait,
landscape and square photos: no image stretched, SDXL time ids per image, latent cache and prior preservation,
a mid-epoch resume that continues the same schedule."""

import math

import pytest
import torch
from PIL import Image

import tsd_diffusion.train_sdxl as T
from shared.errors import InputError
from tests.helpers import kill_after_first_checkpoint, single_thread, train_tiny_sdxl  # noqa: F401
from tsd_common.training import read_loss_log
from tsd_diffusion.buckets import BucketBatchSampler, Buckets
from tsd_diffusion.data import DreamBoothDataset

#: (width, height) of the mixed folder: landscape, portrait, square, very wide, slightly tall, large square
SIZES = [(120, 80), (80, 120), (96, 96), (160, 64), (90, 100), (200, 200)]


def mixed_photos(directory, sizes=SIZES):
    """A folder of photos of the given sizes, each with its own gradient and a disc (visible distortion)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        img = Image.new("RGB", (w, h), (40 * i % 255, 90, 200 - 20 * i))
        from PIL import ImageDraw

        ImageDraw.Draw(img).ellipse((w // 4, h // 4, w // 4 + min(w, h) // 2, h // 4 + min(w, h) // 2),
                                    fill=(250, 220, 30))
        img.save(directory / f"photo{i}.png")
    return directory


def test_buckets_match_kohyas_construction_and_nearest_ratio():
    b = Buckets.build(64, 16, 128, 16)
    brute = set()
    for w in range(16, 129, 16):
        h = min(128, 64 * 64 // w // 16 * 16)
        if h >= 16:
            brute |= {(h, w), (w, h)}
    assert set(b.sizes) == brute | {(64, 64)}
    assert all(h * w <= 64 * 64 and h % 16 == 0 and w % 16 == 0 for h, w in b.sizes)
    for hw in [(80, 120), (120, 80), (96, 96), (64, 160), (1000, 10)]:
        got = b.assign(hw)
        best = min(abs(math.log(s[1] / s[0]) - math.log(hw[1] / hw[0])) for s in b.sizes)
        assert abs(math.log(got[1] / got[0]) - math.log(hw[1] / hw[0])) == best
    # no upscale: the image's own size, scaled down to the area, floored to the step; too small -> excluded
    nu = Buckets.build(64, 32, 128, 16, no_upscale=True)
    assert nu.assign((50, 40)) == (48, 32) and nu.assign((20, 100)) is None
    h, w = nu.assign((400, 200))
    assert h * w <= 64 * 64 and (h, w) == (int(400 * math.sqrt(4096 / 80000)) // 16 * 16, int(200 * math.sqrt(
        4096 / 80000)) // 16 * 16)


@pytest.mark.parametrize("args, message", [
    ((64, 16, 128, 12), "--bucket_reso_steps must be a positive multiple of 8"),
    ((64, 24, 128, 16), "--min_bucket_reso 24 must be a positive multiple"),
    ((64, 80, 128, 16), "--min_bucket_reso <= --resolution <= --max_bucket_reso"),
    ((64, 16, 48, 16), "--min_bucket_reso <= --resolution <= --max_bucket_reso"),
])
def test_bad_bucket_settings_name_the_flag(args, message):
    with pytest.raises(InputError, match=message):
        Buckets.build(*args)


def test_schedule_is_seeded_one_bucket_per_batch_and_sharded():
    buckets = [(64, 64)] * 5 + [(48, 80)] * 3 + [(80, 48)] * 4
    s = BucketBatchSampler(buckets, 2, seed=3)
    for epoch in range(3):
        sched = s.schedule(epoch)
        assert sched == BucketBatchSampler(buckets, 2, seed=3).schedule(epoch)  # deterministic
        assert sorted(i for b in sched for i in b) == list(range(12))  # every item once per epoch
        assert all(len({buckets[i] for i in b}) == 1 for b in sched)  # one bucket per batch
    assert s.schedule(0) != s.schedule(1) and s.schedule(0) != BucketBatchSampler(buckets, 2, seed=4).schedule(0)
    # 7 batches on 2 processes with accumulation 2: padded to 8, each process 4 (2 optimizer steps)
    shares = []
    for rank in range(2):
        r = BucketBatchSampler(buckets, 2, seed=3, num_replicas=2, rank=rank, multiple_of=2)
        r.set_epoch(1)
        shares.append(list(r))
        assert len(r) == 4 == len(shares[-1])
    sched = s.schedule(1)
    padded = [sched[i % len(sched)] for i in range(8)]
    assert shares[0] == padded[0::2] and shares[1] == padded[1::2]


def test_dataset_crops_every_photo_to_its_bucket_without_stretching(tmp_path):
    photos = mixed_photos(tmp_path / "mixed")
    buckets = Buckets.build(64, 16, 128, 16)
    ds = DreamBoothDataset(photos, "a photo of sks thing", 64, random_flip=True, buckets=buckets)
    for i in range(len(ds)):
        item = ds[i]
        (w, h) = SIZES[i]
        bh, bw = buckets.assign((h, w))
        assert item["target_size"] == (bh, bw) == tuple(item["pixel_values"].shape[1:])
        assert item["original_size"] == (h, w)
        params = ds.transform.sample_params((h, w), ds._rng(0, i), (bh, bw))
        rh, rw = params.resized_size
        # one scale for both axes: the binding side is exact, the other rounds down (< 1 px from h/w)
        assert (rh == bh or rw == bw) and rh >= bh and rw >= bw
        assert abs(rw - rh * w / h) < 1 + 1e-9 or abs(rh - rw * h / w) < 1 + 1e-9
        top, left = item["crop_top_left"]
        assert 0 <= top <= rh - bh and 0 <= left <= rw - bw


def record_batches(monkeypatch):
    """Every collated batch the trainer builds (the training loader and the inits' batches)."""
    seen = []
    original = getattr(T.collate, "__wrapped__", T.collate)

    def recording(items):
        batch = original(items)
        seen.append(batch)
        return batch

    recording.__wrapped__ = original
    monkeypatch.setattr(T, "collate", recording)
    return seen


def test_mixed_folder_trains_in_buckets_with_per_image_time_ids(tmp_path, monkeypatch, capsys):
    photos = mixed_photos(tmp_path / "mixed")
    seen = record_batches(monkeypatch)
    summary = train_tiny_sdxl(tmp_path / "run", "--instance_data_dir", str(photos), "--instance_prompt",
                              "a photo of sks thing", "--enable_bucket", "--random_flip", steps=6)
    assert summary["adapters"]["unet"].switched and len(seen) >= 6
    buckets = Buckets.build(64, 16, 128, 16)
    sizes = {str((photos / f"photo{i}.png").resolve()): (h, w) for i, (w, h) in enumerate(SIZES)}
    shapes = set()
    for batch in seen:
        (shape,) = {tuple(p.shape[1:]) for p in batch["pixel_values"]}  # one bucket per batch
        shapes.add(shape)
        for path, ids, flip in zip(batch["paths"], batch["time_ids"], batch["flipped"], strict=True):
            h, w = sizes[path]
            assert buckets.assign((h, w)) == shape
            assert ids[:2].tolist() == [h, w] and ids[4:].tolist() == list(shape)  # original, ..., target
            assert isinstance(flip, bool)
    assert len(shapes) >= 3  # portrait, landscape and square buckets all trained
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    # the start-up print: every photo on the line of its bucket (w x h), with the bucket's image count
    printed = capsys.readouterr().out.splitlines()
    assert f"buckets: {len(SIZES)} images in {len({buckets.assign((h, w)) for w, h in SIZES})} bucket(s)" in printed
    for i, (w, h) in enumerate(SIZES):
        bh, bw = buckets.assign((h, w))
        line, = [x for x in printed if f"photo{i}.png" in x and x.startswith("  ")]
        count = sum(buckets.assign((hh, ww)) == (bh, bw) for ww, hh in SIZES)
        assert line.startswith(f"  {bw}x{bh}: {count} image(s): ")


def test_bucket_schedule_is_deterministic_under_the_seed(tmp_path, monkeypatch):
    photos = mixed_photos(tmp_path / "mixed")
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        seen = record_batches(monkeypatch)
        train_tiny_sdxl(tmp_path / name, "--instance_data_dir", str(photos), "--instance_prompt",
                        "a photo of sks thing", "--enable_bucket", "--seed", seed, "--train_batch_size", "1",
                        "--method", "lora", steps=8)
        runs[name] = [b["paths"] for b in seen]
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]
    assert [r["loss"] for r in read_loss_log(tmp_path / "a")] == [r["loss"] for r in read_loss_log(tmp_path / "b")]


def test_mid_epoch_resume_continues_the_same_schedule(tmp_path, monkeypatch):
    photos = mixed_photos(tmp_path / "mixed")
    common = ["--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks thing", "--enable_bucket",
              "--random_flip", "--checkpointing_steps", "2", "--dash_warmup_steps", "4", "--train_batch_size", "1",
              "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3"]
    seen = record_batches(monkeypatch)
    full = train_tiny_sdxl(tmp_path / "full", *common, steps=7)["adapters"]["unet"]
    full_paths = [b["paths"] for b in seen]
    restore = kill_after_first_checkpoint(monkeypatch)  # at step 2: mid-epoch (6 photos, 3 steps per epoch)
    with pytest.raises(KeyboardInterrupt):
        train_tiny_sdxl(tmp_path / "killed", *common, steps=7)
    restore()
    seen.clear()
    resumed = train_tiny_sdxl(tmp_path / "killed", *common, "--resume_from_checkpoint", "latest",
                              steps=7)["adapters"]["unet"]
    assert resumed.num_steps == 7 and resumed.switched
    assert len(seen) == 10 and [b["paths"] for b in seen] == full_paths[4:]  # the batches after step 2
    logs = [read_loss_log(tmp_path / d) for d in ("killed", "full")]
    assert [(r["step"], r["loss"]) for r in logs[0]] == [(r["step"], r["loss"]) for r in logs[1]]
    for name in full.layers:
        torch.testing.assert_close(resumed.delta_weight(name), full.delta_weight(name), rtol=1e-5, atol=1e-6)


def test_buckets_with_latent_cache_and_prior_preservation(tmp_path, monkeypatch):
    """Class images are cropped to their instance's bucket; the latent cache (keyed by the bucket too) trains the
    same as no cache."""
    photos = mixed_photos(tmp_path / "mixed", SIZES[:4])
    prior = ["--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"), "--class_prompt",
             "a photo of a thing", "--num_class_images", "3"]
    common = ["--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks thing", "--enable_bucket",
              "--center_crop", *prior]
    seen = record_batches(monkeypatch)
    a = train_tiny_sdxl(tmp_path / "a", *common, steps=5)["adapters"]["unet"]
    class_batches = [b for b in seen if b["is_class"].any()]
    assert class_batches and all(len({tuple(p.shape) for p in b["pixel_values"]}) == 1 for b in class_batches)
    b = train_tiny_sdxl(tmp_path / "b", *common, "--cache_latents", steps=5)["adapters"]["unet"]
    for name in a.layers:
        torch.testing.assert_close(a.delta_weight(name), b.delta_weight(name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--enable_bucket", "--min_bucket_reso", "80"], "--min_bucket_reso <= --resolution <= --max_bucket_reso"),
    (["--enable_bucket", "--bucket_reso_steps", "12"], "--bucket_reso_steps must be a positive multiple of 8"),
    (["--min_bucket_reso", "16"], "--min_bucket_reso needs --enable_bucket"),
    (["--enable_bucket", "--bucket_no_upscale", "--min_bucket_reso", "64"],
     r"6 of 6 instance images are smaller than the smallest bucket"),
])
def test_bucket_range_errors_before_training(tmp_path, extra, message):
    photos = mixed_photos(tmp_path / "mixed", [(60, 50)] * 6)
    with pytest.raises(InputError, match=message):
        train_tiny_sdxl(tmp_path / "bad", "--instance_data_dir", str(photos), "--instance_prompt",
                        "a photo of sks thing", *extra)
    assert not (tmp_path / "bad" / "loss_log.csv").exists()


@pytest.mark.slow
def test_two_processes_train_their_shares_of_one_bucket_schedule(tmp_path):
    """Two gloo processes on a mixed folder: each draws its own batches of the one schedule and both switch to
    identical directions."""
    import json
    import subprocess
    import sys

    from tests.helpers import REPO, free_port, launcher_env

    photos = mixed_photos(tmp_path / "mixed")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--gpu_ids", "all", "--main_process_port", str(free_port()), "--mixed_precision",
           "no", "--dynamo_backend", "no", str(REPO / "apps" / "train_sdxl.py"), "--pretrained_model_name_or_path",
           T.EMBEDDED_NAME, "--output_dir", str(tmp_path / "ddp"), "--instance_data_dir", str(photos),
           "--instance_prompt", "a photo of sks thing", "--enable_bucket", "--max_train_steps", "4",
           "--dash_warmup_steps", "2", "--dash_directions", "2", "--train_batch_size", "1", "--num_validation_images",
           "1", "--validation_inference_steps", "2"]
    proc = subprocess.run(cmd, env=launcher_env(ACCELERATE_USE_CPU="true", PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "ddp" / "dash_switch.json").read_text())["unet"]
    assert record["processes"] == 2 and record["fingerprints"][0] == record["fingerprints"][1]
    # 6 photos in batches of 1 on 2 processes: 3 steps per epoch, so 4 steps reach the second epoch
    assert len(read_loss_log(tmp_path / "ddp")) == 4
