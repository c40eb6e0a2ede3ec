"""DreamBooth on the shipped mini SDXL, ``apps/train_sdxl.py``'s default: the recipe's defaults, its replay prior,
the subject metrics on cases with a known answer, and a real short run whose exported LoRA (UNet + both text
encoders) reloads in stock diffusers and whose validation metrics move the right way."""

import json
from pathlib import Path

import pytest
import torch

from scripts.fetch_assets import asset_path
from tsd_diffusion import evaluation as ev
from tsd_diffusion import mini_sdxl as mini
from tsd_diffusion import train_sdxl as T
from tsd_diffusion.tiny import make_subject_images

needs_assets = pytest.mark.skipif(
    asset_path("bigbench") is None or asset_path("clip_tokenizer") is None
    or not (mini.WEIGHTS_DIR / "model_index.json").is_file(),
    reason="needs the shipped mini SDXL weights and the bigbench + clip_tokenizer assets "
           "(python scripts/fetch_assets.py --only bigbench clip_tokenizer)")


def test_default_run_is_the_mini_recipe_and_flags_win(tmp_path):
    a = T.finalize_args(T.parse_args(["--output_dir", str(tmp_path)]))
    assert a.pretrained_model_name_or_path == mini.MINI_NAME
    assert (a.resolution, a.learning_rate, a.text_encoder_lr, a.max_train_steps, a.train_batch_size) == (32, 1e-3, 1e-3, 200, 16)
    assert a.train_text_encoder and a.with_prior_preservation and a.random_flip
    assert a.class_prompt_dropout == 0.1 and a.num_class_images == 1000 and a.class_data_dir is None  # built in main()
    assert a.embedded_subject and a.instance_prompt == "a photo of sks automobile"
    assert a.validation_prompt == ["a photo of sks automobile", "a photo of a automobile", "a photo of a dog"]
    b = T.finalize_args(T.parse_args(["--output_dir", str(tmp_path), "--no-train_text_encoder", "--resolution", "64",
                                      "--no-with_prior_preservation", "--train_batch_size", "2"]))
    assert not b.train_text_encoder and not b.with_prior_preservation and (b.resolution, b.train_batch_size) == (64, 2)
    c = T.finalize_args(T.parse_args(["--output_dir", str(tmp_path), "--pretrained_model_name_or_path", str(tmp_path),
                                      "--instance_data_dir", str(tmp_path), "--instance_prompt", "a photo of sks dog"]))
    assert (c.resolution, c.learning_rate, c.text_encoder_lr, c.train_text_encoder, c.with_prior_preservation) == \
        (1024, 1e-4, 5e-6, False, False)
    assert c.validation_prompt == ["a photo of sks dog"]
    with pytest.raises(ValueError, match="--class_data_dir"):
        T.finalize_args(T.parse_args(["--output_dir", str(tmp_path), "--pretrained_model_name_or_path", str(tmp_path),
                                      "--instance_data_dir", str(tmp_path), "--instance_prompt", "x y",
                                      "--with_prior_preservation"]))


@needs_assets
def test_replay_prior_cycles_classes_and_its_captions_survive_the_cut(tmp_path, monkeypatch):
    from tsd_diffusion.data import DreamBoothDataset

    (tmp_path / "cache").mkdir()
    for name in ("bigbench", "clip_tokenizer"):
        (tmp_path / "cache" / name).symlink_to(asset_path(name))
    monkeypatch.setenv("TSD_CACHE", str(tmp_path / "cache"))
    d = mini.materialize_replay_prior(per_class=3)
    assert d == tmp_path / "cache" / "mini-sdxl-replay-3" / "images"
    rows = [json.loads(line) for line in (d / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and {r["file_name"].split("_", 1)[1][:-4] for r in rows} == set(mini.CLASSES)
    assert all(r["file_name"].split("_", 1)[1][:-4] in r["text"] for r in rows)
    make_subject_images(tmp_path / "car", n=2, size=64, subject="car")
    ds = DreamBoothDataset(tmp_path / "car", "a photo of sks automobile", 32, class_dir=d, num_class_images=10)
    prompts = [ds.plan(i)["class_example"]["prompt"] for i in range(10)]  # the first 10 files: one per class
    assert prompts == [f"a photo of a {c}" for c in mini.CLASSES]


@needs_assets
def test_subject_probe_separates_the_subject_from_real_images_and_new_views_count():
    """Known answers: new drawings of the same toy car (other seed: new positions, colours, facing) are the subject;
    real CIFAR train-split images (never the probe's negatives, which are the held-out ones) are not."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subject = make_subject_images(Path(tmp) / "a", n=5, size=96, seed=0, subject="car")
        new_views = ev.load_images(make_subject_images(Path(tmp) / "b", n=16, size=96, seed=7, subject="car"), 32)
        evaluator = ev.SubjectEvaluator.for_base(mini.WEIGHTS_DIR, subject, 32)
    x, y = mini.load_cifar(asset_path("bigbench"))
    x_train, y_train, _, _ = mini.split_cifar(x, y)
    real_cars = mini.to_tensor(x_train[y_train == 1][:200])
    assert evaluator.probe.score(new_views) > 0.8
    assert evaluator.probe.score(real_cars) < 0.15
    assert evaluator.probe.score(mini.to_tensor(x_train[::20])) < 0.15
    scores = evaluator.score("a photo of sks automobile", new_views)
    assert scores["class"] == "automobile" and scores["subject_retrieval"] > 0.5 and scores["num_images"] == 16
    assert ev.SubjectEvaluator.for_base(mini.WEIGHTS_DIR, subject, 64) is None  # other resolution: no evaluator


def test_augment_views_stay_in_range_and_are_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    a, b = ev.augment_views(x, 10, seed=1), ev.augment_views(x, 10, seed=1)
    assert a.shape == (10, 3, 32, 32) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, ev.augment_views(x, 10, seed=2))


@needs_assets
@pytest.mark.slow
def test_short_default_run_moves_toward_the_subject_and_reloads_in_stock_diffusers(tmp_path):
    """The default recipe (text-encoder LoRA, replay prior) at half its batch and 150 steps, plain LoRA: the subject
    probe of the "sks" prompt rises well above the untrained base's on the same seeds, the other class stays that
    class, and stock ``load_lora_weights`` of the exported file (UNet + both text encoders) redraws the run's own
    validation images."""
    from accelerate.state import AcceleratorState
    from diffusers import StableDiffusionXLPipeline

    from benchmarks.subject_study import score_base

    AcceleratorState._reset_state(reset_partial_state=True)
    photos = tmp_path / "photos"
    make_subject_images(photos, n=5, size=96, seed=0, subject="car")
    out = tmp_path / "run"
    summary = T.main(T.parse_args(["--output_dir", str(out), "--instance_data_dir", str(photos), "--instance_prompt",
                                   "a photo of sks automobile", "--method", "lora", "--max_train_steps", "150",
                                   "--train_batch_size", "8", "--num_validation_images", "8",
                                   "--checkpointing_steps", "1000"]))
    after = summary["validation_metrics"]
    before = score_base({"subject": "car", "seed": 0, "num_images": 8}, photos)
    assert [m["prompt"] for m in after] == [m["prompt"] for m in before]
    assert after[0]["subject_probe"] > before[0]["subject_probe"] + 0.15, (before[0], after[0])
    assert after[2]["class_accuracy"] >= 0.5, after[2]  # "a photo of a dog" is still a dog
    assert json.loads((out / "validation" / "step-150" / "metrics.json").read_text()) == after
    pipe = StableDiffusionXLPipeline.from_pretrained(summary["base"], dtype=torch.float32)
    pipe.load_lora_weights(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of sks automobile", num_images_per_prompt=8, generator=torch.Generator().manual_seed(0),
                  num_inference_steps=25, height=32, width=32, output_type="np").images
    from PIL import Image
    import numpy as np

    saved = np.stack([np.asarray(Image.open(out / "validation" / "step-150" / f"prompt0-{j}.png")) for j in range(8)])
    assert np.abs(saved.astype(int) - (images * 255).round().clip(0, 255).astype(int)).max() <= 2
