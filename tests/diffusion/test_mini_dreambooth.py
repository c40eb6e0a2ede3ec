"""DreamBooth on the shipped mini SDXL, ``apps/train_sdxl.py``'s default: the recipe's defaults, its replay prior,
the subject metrics on cases with a known answer, and a real short run whose exported LoRA (UNet + both text
encoders) reloads in stock diffusers and whose validation metrics move the right way."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import REPO
from tsd_diffusion import evaluation as ev
from tsd_diffusion import mini_sdxl as mini
from tsd_diffusion import train_sdxl as T
from tsd_diffusion.tiny import make_subject_images


def test_default_run_is_the_mini_recipe_and_flags_win(tmp_path):
    a = T.SDXLTrainConfig.from_args(T.parse_args(["--output_dir", str(tmp_path)]))
    assert a.pretrained_model_name_or_path == mini.MINI_NAME
    assert ((a.resolution, a.learning_rate, a.text_encoder_lr, a.max_train_steps, a.train_batch_size)
            == (32, 1e-3, 1e-3, 200, 16))
    assert a.train_text_encoder and a.with_prior_preservation and a.random_flip
    assert a.class_prompt_dropout == 0.1 and a.num_class_images == 1000 and a.class_data_dir is None  # built in main()
    assert a.embedded_subject and a.instance_prompt == "a photo of sks automobile"
    assert a.validation_prompt == ["a photo of sks automobile", "a photo of a automobile", "a photo of a dog"]
    b = T.SDXLTrainConfig.from_args(T.parse_args(["--output_dir", str(tmp_path), "--no-train_text_encoder",
                                      "--resolution", "64", "--no-with_prior_preservation", "--train_batch_size", "2"]))
    assert not b.train_text_encoder and not b.with_prior_preservation and (b.resolution, b.train_batch_size) == (64, 2)
    c = T.SDXLTrainConfig.from_args(T.parse_args(["--output_dir", str(tmp_path),
                                      "--pretrained_model_name_or_path", str(tmp_path),
                                      "--instance_data_dir", str(tmp_path), "--instance_prompt", "a photo of sks dog"]))
    assert (c.resolution, c.learning_rate, c.text_encoder_lr, c.train_text_encoder, c.with_prior_preservation) == \
        (1024, 1e-4, 5e-6, False, False)
    assert c.validation_prompt == ["a photo of sks dog"]
    with pytest.raises(ValueError, match="--class_data_dir"):
        T.SDXLTrainConfig.from_args(T.parse_args(["--output_dir", str(tmp_path),
                                      "--pretrained_model_name_or_path", str(tmp_path),
                                      "--instance_data_dir", str(tmp_path), "--instance_prompt", "x y",
                                      "--with_prior_preservation"]))


def test_replay_prior_cycles_classes_and_its_captions_survive_the_cut(tmp_path, monkeypatch):
    from PIL import Image

    from tsd_diffusion.data import DreamBoothDataset

    monkeypatch.setenv("TSD_CACHE", str(tmp_path / "cache"))  # empty: everything comes from the package
    d = mini.materialize_replay_prior(per_class=3)
    assert d.parent.parent == tmp_path / "cache" and d.parent.name.endswith("-3") and d.name == "images"
    assert mini.materialize_replay_prior(per_class=3) == d
    shipped, labels, captions = mini.load_class_set(mini.WEIGHTS_DIR / mini.REPLAY_PRIOR_FILE)
    assert np.array_equal(np.asarray(Image.open(d / "0001_cat.png")), shipped[13].numpy())  # k=1 of class 3
    with pytest.raises(ValueError, match="per_class"):
        mini.materialize_replay_prior(per_class=101)
    rows = [json.loads(line) for line in (d / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and {r["file_name"].split("_", 1)[1][:-4] for r in rows} == set(mini.CLASSES)
    assert all(r["file_name"].split("_", 1)[1][:-4] in r["text"] for r in rows)
    assert {r["text"] for r in rows} <= set(captions)
    make_subject_images(tmp_path / "car", n=2, size=64, subject="car")
    ds = DreamBoothDataset(tmp_path / "car", "a photo of sks automobile", 32, class_dir=d, num_class_images=10)
    prompts = [ds.plan(i)["class_example"]["prompt"] for i in range(10)]  # the first 10 files: one per class
    assert prompts == [f"a photo of a {c}" for c in mini.CLASSES]


def test_subject_probe_separates_the_subject_from_other_images_and_new_views_count():
    """Known answers: new drawings of the same toy car (other seed: new positions, colours, facing) are the subject;
    the base's replay-prior images (never the probe's negatives, which are the reference set) are not, its cars
    included."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subject = make_subject_images(Path(tmp) / "a", n=5, size=96, seed=0, subject="car")
        new_views = ev.load_images(make_subject_images(Path(tmp) / "b", n=16, size=96, seed=7, subject="car"), 32)
        evaluator = ev.SubjectEvaluator.for_base(mini.WEIGHTS_DIR, subject, 32)
    x, y, _ = mini.load_class_set(mini.WEIGHTS_DIR / mini.REPLAY_PRIOR_FILE)
    other_cars = mini.to_tensor(x[y == 1].numpy())
    assert evaluator.probe.score(new_views) > 0.8
    assert evaluator.probe.score(other_cars) < 0.15
    assert evaluator.probe.score(mini.to_tensor(x[::7].numpy())) < 0.15
    scores = evaluator.score("a photo of sks automobile", new_views)
    assert scores["class"] == "automobile" and scores["subject_retrieval"] > 0.5 and scores["num_images"] == 16
    assert ev.SubjectEvaluator.for_base(mini.WEIGHTS_DIR, subject, 64) is None  # other resolution: no evaluator


def test_augment_views_stay_in_range_and_are_deterministic():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    a, b = ev.augment_views(x, 10, seed=1), ev.augment_views(x, 10, seed=1)
    assert a.shape == (10, 3, 32, 32) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, ev.augment_views(x, 10, seed=2))


@pytest.mark.slow
def test_default_recipe_lora_run_binds_the_subject_and_reloads_in_stock_diffusers(tmp_path):
    """The default recipe (text-encoder LoRA, replay prior, batch 16 + 16) with plain LoRA at 400 steps: the subject
    probe of the "sks" prompt rises well above the untrained base's on the same seeds, the other class stays that
    class, and stock ``load_lora_weights`` of the exported file (UNet + both text encoders) redraws the run's own
    validation images.

    400, not the default 200 steps: at 200 steps binding on this base depends on the seed (on these drawn photos the
    probe rose by 0.28 at seed 0 and by 0.02 at seed 1); at 400 it rose by 0.16, 0.30 and 0.36 at seeds 0, 1 and 2
    (docs/mini_sdxl.md, "How reliably it binds"). The margin asked for, 0.10, is below all three."""
    from accelerate.state import AcceleratorState
    from diffusers import StableDiffusionXLPipeline

    from benchmarks.subject_study import score_base

    AcceleratorState._reset_state(reset_partial_state=True)
    photos = tmp_path / "photos"
    make_subject_images(photos, n=5, size=96, seed=0, subject="car")
    out = tmp_path / "run"
    summary = T.main(T.parse_args(["--output_dir", str(out), "--instance_data_dir", str(photos), "--instance_prompt",
                                   "a photo of sks automobile", "--method", "lora", "--max_train_steps", "400",
                                   "--num_validation_images", "8",
                                   "--checkpointing_steps", "1000"]))
    after = summary["validation_metrics"]
    before = score_base({"subject": "car", "seed": 0, "num_images": 8}, photos)
    assert [m["prompt"] for m in after] == [m["prompt"] for m in before]
    assert after[0]["subject_probe"] > before[0]["subject_probe"] + 0.10, (before[0], after[0])
    assert after[2]["class_accuracy"] >= 0.5, after[2]  # "a photo of a dog" is still a dog
    assert json.loads((out / "validation" / "step-400" / "metrics.json").read_text()) == after
    pipe = StableDiffusionXLPipeline.from_pretrained(summary["base"], dtype=torch.float32)
    pipe.load_lora_weights(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of sks automobile", num_images_per_prompt=8, generator=torch.Generator().manual_seed(0),
                  num_inference_steps=25, height=32, width=32, output_type="np").images
    from PIL import Image

    saved = np.stack([np.asarray(Image.open(out / "validation" / "step-400" / f"prompt0-{j}.png")) for j in range(8)])
    assert np.abs(saved.astype(int) - (images * 255).round().clip(0, 255).astype(int)).max() <= 2


def _no_network_prefix() -> list[str] | None:
    """``unshare -n`` (a network namespace with no network at all) as root, else ``unshare -rn`` (as root inside a
    user namespace); None where neither works here."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


@pytest.mark.slow
def test_default_main_job_runs_with_no_network_and_an_empty_cache(tmp_path):
    """The main job, ``accelerate launch apps/train_sdxl.py`` with the default recipe (only fewer steps and
    validation images), in a network namespace with no network and an empty ``TSD_CACHE``: everything it needs
    ships with the package (the mini SDXL, its tokenizers, the replay prior, the metrics' gallery)."""
    import subprocess
    import sys

    prefix = _no_network_prefix()
    if prefix is None:
        pytest.skip("`unshare -n` / `unshare -rn` is not available here, so no run without network can be made")
    repo = REPO
    cache, out = tmp_path / "empty-cache", tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(TSD_CACHE=str(cache), OMP_NUM_THREADS="2", PYTHONPATH=str(repo))
    cmd = [*prefix, sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(repo / "apps" / "train_sdxl.py"), "--output_dir", str(out), "--max_train_steps", "4",
           "--dash_warmup_steps", "2", "--num_validation_images", "2", "--validation_inference_steps", "3"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    metrics = json.loads((out / "validation" / "step-4" / "metrics.json").read_text())
    assert [m["prompt"] for m in metrics] == ["a photo of sks automobile", "a photo of a automobile",
                                              "a photo of a dog"]
    args = json.loads((out / "training_args.json").read_text())
    assert args["resolved_base"] == str(mini.WEIGHTS_DIR) and args["with_prior_preservation"]
    assert json.loads((out / "dash_switch.json").read_text())["unet"]["step"] == 2
    assert all("mini-sdxl-replay" in p.name for p in cache.iterdir())  # the cache got the replay prior, nothing else
