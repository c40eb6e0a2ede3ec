"""The SDXL DreamBooth trainer end to end on the embedded tiny SDXL: outputs, stock-diffusers equivalence,
resume equivalence, checkpoint pruning, data-driven inits and bad input."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tsd_diffusion.train_sdxl as T
from shared.errors import InputError
from tests.helpers import (  # noqa: F401 (single_thread: an autouse fixture)
    DEVICE,
    NEEDS_CUDA,
    REPO,
    free_port,
    kill_after_first_checkpoint,
    launcher_env,
    single_thread,
    train_tiny_sdxl,
)
from tsd_common.training import read_loss_log
from tsd_diffusion.loss import sequential_batches, statistics_batches, unet_loss
from tsd_diffusion.models import SDXLParts

run = train_tiny_sdxl


def _images(pipe, prompt="a photo of sks teapot"):
    pipe.to(DEVICE)  # the trained UNet is where accelerate put it; the stock reload joins it
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), height=64, width=64,
                output_type="np").images


def test_default_run_writes_everything_and_loads_in_stock_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    summary = run(out, "--learning_rate", "1e-2")  # large enough that λ moves visibly in 3 dash steps
    for name in ("pytorch_lora_weights.safetensors", "training_args.json", "tsd_report.csv", "tsd_report.png",
                 "loss_log.csv", "tsd_state/unet/tsd_adapter.safetensors"):
        assert (out / name).is_file(), name
    assert summary["validation_images"] and all(p.endswith(".png") for p in summary["validation_images"])
    record = json.loads((out / "training_args.json").read_text())
    assert record["resolved_base"] == summary["base"] and record["method"] == "dash"
    unet_adapter = summary["adapters"]["unet"]
    assert unet_adapter.switched and unet_adapter.num_steps == 6

    trained = StableDiffusionXLPipeline.from_pretrained(summary["base"], unet=unet_adapter.model)
    expected = _images(trained)
    stock = StableDiffusionXLPipeline.from_pretrained(summary["base"])
    stock.load_lora_weights(str(out))
    assert np.abs(_images(stock) - expected).max() <= 1e-4

    # dropping the dash block (what the reference implementation's files lose in diffusers) changes the images
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    r = 4
    cut = {k: (v[:r] if "lora_A" in k else v[:, :r]).contiguous() for k, v in sd.items()}
    (tmp_path / "nodash").mkdir()
    save_file(cut, tmp_path / "nodash" / "pytorch_lora_weights.safetensors")
    nodash = StableDiffusionXLPipeline.from_pretrained(summary["base"])
    nodash.load_lora_weights(str(tmp_path / "nodash"))
    assert np.abs(_images(nodash) - expected).max() > 1e-3


def test_resume_after_kill_equals_uninterrupted_run_across_the_switch(tmp_path, monkeypatch):
    common = ["--dash_warmup_steps", "4", "--checkpointing_steps", "3", "--random_flip", "--lr_scheduler", "cosine",
              "--learning_rate", "1e-3"]
    full = run(tmp_path / "full", *common, steps=7)["adapters"]["unet"]

    restore = kill_after_first_checkpoint(monkeypatch)  # at step 3, before the switch at 4
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", *common, steps=7)
    restore()
    assert (tmp_path / "killed" / "checkpoint-3" / "unet" / "tsd_adapter.safetensors").is_file()
    resumed = run(tmp_path / "killed", *common, "--resume_from_checkpoint", "latest", steps=7)["adapters"]["unet"]
    assert resumed.switched and resumed.num_steps == 7
    # the loss log survives the kill too (wall-clock columns aside)
    logs = [read_loss_log(tmp_path / d) for d in ("killed", "full")]
    assert [(r["step"], r["loss"], r["lr"]) for r in logs[0]] == [(r["step"], r["loss"], r["lr"]) for r in logs[1]]
    for name in full.layers:
        torch.testing.assert_close(resumed.delta_weight(name), full.delta_weight(name), rtol=1e-5, atol=1e-6)
        assert torch.equal(resumed.dash_term(name).indices, full.dash_term(name).indices)
    # a new run over the checkpoints is refused before any model loads, unless told to start over
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-3, checkpoint-6\)"):
        run(tmp_path / "killed", *common, steps=7)
    run(tmp_path / "killed", *common, "--overwrite_output_dir", steps=2)
    assert not list((tmp_path / "killed").glob("checkpoint-*"))


def test_checkpoints_are_pruned_after_a_new_one_is_complete(tmp_path):
    out = tmp_path / "ck"
    run(out, "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", steps=7)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list(out.glob(".checkpoint-*"))
    # a checkpoint holds the adapter state and accelerate's optimizer/scheduler/RNG, not the frozen base
    files = {p.name for p in (out / "checkpoint-6").rglob("*") if p.is_file()}
    assert ("tsd_adapter.safetensors" in files
            and not any("diffusion_pytorch_model" in f or f == "model.safetensors" for f in files))


def test_latent_cache_gives_the_same_training_and_skips_decoding_cached_images(tmp_path, monkeypatch):
    """6 steps of batch 2 over 5 photos (epochs of 2 + 2 + 1) with a fixed crop: the cached run decodes each photo
    once, in the first epoch; the second epoch's 5 examples come from the cache without decoding (kohya's
    behaviour), and the training is the same."""
    import tsd_diffusion.data as data

    decoded: list[str] = []
    load = data.load_image
    monkeypatch.setattr(data, "load_image", lambda path: decoded.append(str(path)) or load(path))
    a = run(tmp_path / "a", "--center_crop")["adapters"]["unet"]
    decoded_a, decoded[:] = len(decoded), []
    b = run(tmp_path / "b", "--center_crop", "--cache_latents")["adapters"]["unet"]
    assert decoded_a - len(decoded) == 5, (decoded_a, decoded)
    for name in a.layers:
        torch.testing.assert_close(a.delta_weight(name), b.delta_weight(name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["eva", "lora_da", "lora_init", "tsd", "pissa"])
def test_other_methods_train_and_export(method, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    summary = run(tmp_path / method, "--method", method, "--statistics_batches", "2", steps=4)
    stock = StableDiffusionXLPipeline.from_pretrained(summary["base"])
    stock.load_lora_weights(str(tmp_path / method))
    trained = StableDiffusionXLPipeline.from_pretrained(summary["base"], unet=summary["adapters"]["unet"].model)
    assert np.abs(_images(stock) - _images(trained)).max() <= 1e-4


def test_text_encoder_training_exports_all_components(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    summary = run(tmp_path / "te", "--train_text_encoder", "--text_encoder_lr", "1e-3")
    keys = load_file(tmp_path / "te" / "pytorch_lora_weights.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    ad = summary["adapters"]
    trained = StableDiffusionXLPipeline.from_pretrained(
        summary["base"], unet=ad["unet"].model, text_encoder=ad["text_encoder"].model,
        text_encoder_2=ad["text_encoder_2"].model)
    stock = StableDiffusionXLPipeline.from_pretrained(summary["base"])
    stock.load_lora_weights(str(tmp_path / "te"))
    assert np.abs(_images(stock) - _images(trained)).max() <= 1e-4


@pytest.mark.parametrize("extra, message", [
    (["--instance_data_dir", "/nonexistent/photos", "--instance_prompt", "a photo of sks dog"], "/nonexistent/photos"),
    (["--with_prior_preservation"], "--with_prior_preservation needs --class_data_dir"),
    (["--resolution", "60"], "multiple of 8"),
    (["--rank", "0"], "--rank must be > 0"),
    (["--noise_offset", "-0.1"], "--noise_offset must be >= 0"),
    (["--repeats", "0"], "--repeats must be > 0"),
    pytest.param(["--enable_xformers_memory_efficient_attention"], "needs xformers: pip install xformers",
                 marks=pytest.mark.skipif(importlib.util.find_spec("xformers") is not None,
                                          reason="xformers is installed")),
    (["--dash_directions", "500"], "dash_directions=500 is larger than"),
    (["--optimizer", "adafactor", "--use_8bit_adam"], "--use_8bit_adam is an AdamW option"),
    (["--ema_decay", "0.9"], "--ema_decay needs --use_ema"),
    (["--use_ema", "--ema_decay", "1.0"], r"--ema_decay must be in \(0, 1\)"),
    (["--dash_lr_ratio", "0"], "--dash_lr_ratio must be > 0"),
    (["--cache_text_encoder_outputs", "--train_text_encoder"], "contradicts --train_text_encoder"),
    (["--caption_dropout_rate", "1.0"], r"--caption_dropout_rate must be in \[0, 1\)"),
    (["--logging_steps", "0"], "--logging_steps must be > 0"),
    (["--eval_dino_model", "/nonexistent/dino"], "--eval_dino_model /nonexistent/dino: not a transformers model"),
])
def test_bad_input_fails_before_training(extra, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "bad", *extra)
    assert not (tmp_path / "bad" / "loss_log.csv").exists()


def test_diffusers_dreambooth_flags_take_effect(tmp_path, monkeypatch):
    """--scale_lr, --lr_power, --output_kohya_format, --logging_dir, --allow_tf32, --local_rank,
    --validation_epochs, --image_interpolation_mode and --repeats as in diffusers."""
    import csv

    import accelerate.utils
    from diffusers.optimization import get_scheduler

    projects = []

    class RecordingProjectConfiguration(accelerate.utils.ProjectConfiguration):
        def __init__(self, **kwargs):
            projects.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(accelerate.utils, "ProjectConfiguration", RecordingProjectConfiguration)
    datasets = []

    class RecordingDataset(T.DreamBoothDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            datasets.append(self)

    monkeypatch.setattr(T, "DreamBoothDataset", RecordingDataset)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    out = tmp_path / "run"
    try:
        run(out, "--scale_lr", "--learning_rate", "1e-3", "--lr_scheduler", "polynomial", "--lr_power", "2",
            "--output_kohya_format", "--logging_dir", "tracker-logs", "--allow_tf32", "--local_rank", "0",
            "--validation_epochs", "1", "--image_interpolation_mode", "nearest", "--repeats", "2", steps=6)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert [p["logging_dir"] for p in projects] == [str(out / "tracker-logs")]
    assert [d.transform.interpolation for d in datasets] == ["nearest"]
    # 5 photos x 2 repeats in batches of 2: epoch 1 ends at step 5, then the final validation at step 6
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-5", "step-6"]
    record = json.loads((out / "training_args.json").read_text())
    assert record["learning_rate"] == pytest.approx(2e-3) and record["output_format"] == "kohya"  # 1e-3 x batch 2
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    ref = get_scheduler("polynomial", optimizer=ref_opt, num_warmup_steps=0, num_training_steps=6, power=2.0)
    want = []
    for _ in range(6):
        ref_opt.step()
        ref.step()
        want.append(ref.get_last_lr()[0])
    with open(out / "loss_log.csv") as f:
        assert [float(row["lr"]) for row in csv.DictReader(f)] == pytest.approx(want)
    assert want[0] != pytest.approx(2e-3 * 5 / 6)  # the power is not the default 1
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(k.startswith("lora_unet_") for k in keys)


def test_noise_offset_matches_a_dense_reference():
    """unet_loss with --noise_offset: the target noise is eps + offset * n, n one draw per (sample, channel)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()  # epsilon prediction: with a UNet predicting 0 the loss is mean(target^2)
    latents = torch.randn(3, 4, 8, 8)
    seen = []

    def zero_unet(noisy, t, embeds, added_cond_kwargs, return_dict):
        seen.append((noisy, t))
        return (torch.zeros_like(noisy),)

    args = (zero_unet, scheduler, latents, None, None, None)
    loss = unet_loss(*args, generator=torch.Generator().manual_seed(7), noise_offset=0.1, reduce=False)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g) + 0.1 * torch.randn(3, 4, 1, 1, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    torch.testing.assert_close(loss, noise.pow(2).mean(dim=(1, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(seen[0][0], scheduler.add_noise(latents, noise, t), rtol=1e-6, atol=0)
    plain = unet_loss(*args, generator=torch.Generator().manual_seed(7), noise_offset=0.0, reduce=False)
    g = torch.Generator().manual_seed(7)
    torch.testing.assert_close(plain, torch.randn(latents.shape, generator=g).pow(2).mean(dim=(1, 2, 3)))


def test_report_to_tensorboard_logs_the_loss(tmp_path):
    pytest.importorskip("tensorboard", reason="the tracker test needs tensorboard (the dev extra installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run(out, "--report_to", "tensorboard", steps=3)
    events = EventAccumulator(str(out / "logs" / "tsd-sdxl"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in read_loss_log(out)]
    assert [step for step, _ in logged] == [1, 2, 3]


def test_missing_class_images_are_sampled_from_the_base(tmp_path):
    """As diffusers' DreamBooth: a missing or short class dir is topped up from the base with --class_prompt,
    seeded per image, so a re-sampled image is byte-identical; a full dir is left alone."""
    from PIL import Image

    class_dir = tmp_path / "class"  # does not exist yet
    prior = ["--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a photo of a teapot",
             "--num_class_images", "3", "--sample_batch_size", "2"]
    run(tmp_path / "a", *prior, steps=2)
    files = sorted(class_dir.iterdir())
    assert [f.name[:6] for f in files] == ["00000-", "00001-", "00002-"] and all(f.suffix == ".jpg" for f in files)
    for f in files:
        with Image.open(f) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
    assert len({f.read_bytes() for f in files}) == 3  # three seeds, three images
    last = files[-1].read_bytes()
    files[-1].unlink()
    run(tmp_path / "b", *prior, steps=1)
    again = sorted(class_dir.iterdir())
    assert [f.name for f in again] == [f.name for f in files] and again[-1].read_bytes() == last
    stamps = [f.stat().st_mtime_ns for f in again]
    run(tmp_path / "c", *prior, steps=1)  # full: nothing is sampled
    assert [f.stat().st_mtime_ns for f in sorted(class_dir.iterdir())] == stamps


def test_class_images_sample_at_half_precision_with_an_fp32_vae(tmp_path):
    """Under bf16 the UNet's latents are half precision while SDXL's VAE stays fp32: the decode must cast.
    --prior_generation_precision bf16 under fp32 training samples from a bf16 base of its own: the same bytes as
    sampling under bf16 training, while the trained UNet stays fp32."""
    from PIL import Image

    prior = ["--with_prior_preservation", "--class_prompt", "a photo of a teapot", "--num_class_images", "1"]
    run(tmp_path / "bf16", "--mixed_precision", "bf16", "--class_data_dir", str(tmp_path / "class"), *prior, steps=1)
    (only,) = (tmp_path / "class").iterdir()
    with Image.open(only) as img:
        assert img.size == (64, 64)
    summary = run(tmp_path / "fp32", "--prior_generation_precision", "bf16", "--class_data_dir",
                  str(tmp_path / "class-own"), *prior, steps=1)
    (own,) = (tmp_path / "class-own").iterdir()
    assert own.read_bytes() == only.read_bytes()
    assert {p.dtype for p in summary["adapters"]["unet"].model.parameters()} == {torch.float32}


def test_class_sampling_needs_a_prompt_and_usable_files_before_loading(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"holds no images; sampling --num_class_images=2 from the base "
                                         r"needs --class_prompt"):
        run(tmp_path / "out", "--with_prior_preservation", "--class_data_dir", str(empty), "--num_class_images", "2")
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        run(tmp_path / "out", "--with_prior_preservation", "--class_data_dir", str(empty), "--class_prompt", "a teapot")
    assert not (tmp_path / "out" / "loss_log.csv").exists()


def test_non_image_files_are_named(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (80, 80), "red").save(photos / "ok.png")
    (photos / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        run(tmp_path / "out", "--instance_data_dir", str(photos), "--instance_prompt", "a photo of sks thing")


def test_real_dreambooth_photos_train(shared_data, tmp_path):
    summary = run(tmp_path / "dog", "--instance_data_dir", str(shared_data / "dreambooth" / "dog"),
                  "--instance_prompt", "a photo of sks dog", "--center_crop", "--cache_latents", steps=4)
    assert summary["adapters"]["unet"].switched


@pytest.mark.slow
def test_two_process_gloo_run_switches_identically(tmp_path):
    """Two processes select identical directions; they also split the class-image sampling, which must give the
    same files as one process."""
    import subprocess

    repo = REPO
    port = free_port()
    env = launcher_env(ACCELERATE_USE_CPU="true", PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--gpu_ids", "all", "--main_process_port", str(port), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(repo / "apps" / "train_sdxl.py"),
           "--pretrained_model_name_or_path", "tsd-lora/tiny-sdxl", "--output_dir", str(tmp_path / "ddp"),
           "--max_train_steps", "4", "--dash_warmup_steps", "2", "--dash_directions", "2", "--train_batch_size", "1",
           "--num_validation_images", "1", "--validation_inference_steps", "2", "--checkpointing_steps", "3",
           "--with_prior_preservation", "--class_prompt", "a photo of a teapot", "--num_class_images", "3",
           "--sample_batch_size", "1", "--class_data_dir", str(tmp_path / "class-ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((tmp_path / "ddp" / "dash_switch.json").read_text())["unet"]
    assert record["processes"] == 2 and record["step"] == 2
    assert record["fingerprints"][0] == record["fingerprints"][1]
    assert (tmp_path / "ddp" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "ddp" / "checkpoint-3" / "unet" / "tsd_adapter.safetensors").is_file()
    run(tmp_path / "one", "--with_prior_preservation", "--class_prompt", "a photo of a teapot", "--num_class_images",
        "3", "--class_data_dir", str(tmp_path / "class-one"), steps=1)
    one = {f.name: f.read_bytes() for f in (tmp_path / "class-one").iterdir()}
    assert {f.name: f.read_bytes() for f in (tmp_path / "class-ddp").iterdir()} == one and len(one) == 3


def test_launch_check_refuses_split_runs(monkeypatch):
    from tsd_common.launch import check_launch

    class One:
        num_processes = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="ACCELERATE_USE_CPU=true"):
        check_launch(One())


def test_launch_check_refuses_a_cpu_launch_that_started_one_of_n(monkeypatch):
    from tsd_common.launch import check_launch

    class One:
        num_processes = 1

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    asked_two = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes=2", "train.py"]
    with pytest.raises(InputError, match="--num_processes 2` started 1 process"):
        check_launch(One(), asked_two)
    check_launch(One(), [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "train.py"])
    check_launch(One(), ["bash", "run.sh", "--num_processes", "2"])  # not an accelerate launcher: nothing to say
    check_launch(One(), [])


def test_launch_check_refuses_parameter_sharding(monkeypatch):
    """FSDP and ZeRO-3 are refused before any loading (the trainers save from the main process alone)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tsd_common.launch import check_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def accelerator(kind, zero_stage=None):
        plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
        return SimpleNamespace(num_processes=2, distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))

    with pytest.raises(ValueError, match="FSDP shards the parameters.*--multi_gpu"):
        check_launch(accelerator(DistributedType.FSDP), [])
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        check_launch(accelerator(DistributedType.DEEPSPEED, zero_stage=3), [])
    for ok in (accelerator(DistributedType.DEEPSPEED, zero_stage=2), accelerator(DistributedType.MULTI_GPU),
               accelerator(DistributedType.MULTI_CPU), accelerator(DistributedType.NO)):
        check_launch(ok, [])


def test_statistics_batches_match_what_the_training_step_feeds_the_unet(tmp_path):
    """The data-driven inits' UNet inputs carry the UNet's dtype and device (their time ids stayed fp32 on the CPU,
    which crashed eva, lora_da, lora_init and tsd on CUDA)."""
    from tsd_diffusion.data import DreamBoothDataset
    from tsd_diffusion.tiny import make_subject_images

    make_subject_images(tmp_path / "subject", n=3, size=64, seed=0)
    dataset = DreamBoothDataset(tmp_path / "subject", "a photo of sks teapot", resolution=32)
    condition = lambda prompts: (torch.randn(len(prompts), 7, 16), torch.randn(len(prompts), 16))  # noqa: E731
    latents_for = lambda batch: torch.randn(len(batch["prompts"]), 4, 4, 4, dtype=torch.bfloat16)  # noqa: E731
    batches = statistics_batches(dataset, sequential_batches(len(dataset), 2, 2), condition, latents_for,
                                 torch.device("cpu"), torch.bfloat16)
    assert [b["i"] for b in batches] == [0, 1]
    for b in batches:
        for key in ("latents", "embeds", "pooled", "time_ids"):
            assert b[key].dtype == torch.bfloat16 and b[key].device.type == "cpu", key
        assert b["time_ids"].shape == (2, 6)


@pytest.mark.parametrize("precision, dtype", [
    ("bf16", torch.bfloat16),
    pytest.param("fp16", torch.float16, marks=NEEDS_CUDA),
])
def test_mixed_precision_keeps_trainable_fp32_and_lambda_learns(precision, dtype, tmp_path):
    """Frozen weights in half precision, adapter in fp32; under fp16 the grad scaler must also step λ, the
    parameter group that joins the optimizer at the switch."""
    summary = run(tmp_path / precision, "--mixed_precision", precision, "--learning_rate", "1e-2", steps=6)
    adapter = summary["adapters"]["unet"]
    layer = next(iter(adapter.layers.values()))
    assert layer.get_base_layer().weight.dtype == dtype
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in adapter.trainable_parameters())
    assert adapter.switched
    assert any(adapter.dash_term(n).lam.abs().max() > 0 for n in adapter.dash_layers)  # 3 post-switch steps moved λ
    assert all(np.isfinite(r["loss"]) for r in read_loss_log(tmp_path / precision))
    assert (tmp_path / precision / "pytorch_lora_weights.safetensors").is_file()


def test_replay_prior_with_captions_and_empty_prompt_dropout(tmp_path):
    """Prior preservation from a captioned class dir (a replay prior): each prior image trains with its own caption,
    some with the empty prompt, which the trainer encodes as zeros like the SDXL pipeline's unconditional branch."""
    from tsd_diffusion.tiny import make_subject_images, materialize_tiny_sdxl

    cls = tmp_path / "replay"
    make_subject_images(cls, n=4, size=64, seed=5)
    names = sorted(p.name for p in cls.iterdir())
    (cls / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"a photo of a pot {i}"}) + "\n"
                                                for i, n in enumerate(names)))
    summary = run(tmp_path / "out", "--with_prior_preservation", "--class_data_dir", str(cls),
                  "--class_prompt_dropout", "0.5", steps=4)
    assert summary["adapters"]["unet"].num_steps == 4
    record = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert record["class_prompt_dropout"] == 0.5 and record["class_prompt"] is None

    parts = SDXLParts(str(materialize_tiny_sdxl()))
    assert parts.zeros_for_empty_prompt
    with torch.no_grad():
        embeds, pooled = parts.encode_prompt(["", "a photo of a pot"])
    assert embeds[0].abs().max() == 0 and pooled[0].abs().max() == 0
    assert embeds[1].abs().max() > 0 and pooled[1].abs().max() > 0


@pytest.mark.parametrize("method", ["eva", "lora_da", "lora_init", "tsd", "lora_ga"])
def test_data_driven_inits_under_gradient_checkpointing(method, tmp_path):
    """diffusers' UNet checkpoints whenever grad is enabled, eval mode included, so the inits' statistics pass runs
    under checkpointing (LoRA-DA crashed there): the adapter equals the one without it. LoRA-DA's
    population N is the training set's length."""
    plain = run(tmp_path / "plain", "--method", method, "--statistics_batches", "2", steps=1)["adapters"]["unet"]
    ckpt = run(tmp_path / "ckpt", "--method", method, "--statistics_batches", "2", "--gradient_checkpointing",
               steps=1)["adapters"]["unet"]
    for name in plain.layers:
        for a, b in zip(plain.lora_factors(name), ckpt.lora_factors(name), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if method == "lora_da":
        assert plain.config.lora_da_population == ckpt.config.lora_da_population == 5  # the 5 subject images


def test_statistics_batches_give_each_process_its_own_share(tmp_path):
    """Under DDP process p reads global batches p, p + N, ...: together the processes read exactly the batches of one
    process with N× the budget, each with its global index (which seeds its noise)."""
    from tsd_diffusion.data import DreamBoothDataset
    from tsd_diffusion.tiny import make_subject_images

    make_subject_images(tmp_path / "subject", n=5, size=64, seed=0)
    dataset = DreamBoothDataset(tmp_path / "subject", "a photo of sks teapot", resolution=32)
    condition = lambda prompts: (torch.zeros(len(prompts), 7, 16), torch.zeros(len(prompts), 16))  # noqa: E731
    latents_for = lambda batch: batch["pixel_values"][:, :1].clone()  # noqa: E731  # identifies the images
    everything = sequential_batches(len(dataset), 6, 2)
    make = lambda *share: statistics_batches(dataset, everything, condition, latents_for,  # noqa: E731
                                             torch.device("cpu"), torch.float32, *share)
    single = make()
    shares = [make(p, 2) for p in range(2)]
    assert [b["i"] for b in shares[0]] == [0, 2, 4] and [b["i"] for b in shares[1]] == [1, 3, 5]
    for share in shares:
        for b in share:
            assert torch.equal(b["latents"], single[b["i"]]["latents"]), b["i"]
