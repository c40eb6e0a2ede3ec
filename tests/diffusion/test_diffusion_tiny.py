"""The embedded tiny SDXL base: built once into the cache, loaded through the ordinary from_pretrained path,
deterministic, the real CLIP tokenizer the package ships; resolve_pretrained; the self-drawn subject images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tsd_diffusion import tiny
from tsd_diffusion.data import DreamBoothDataset, collate, list_instance_images
from tsd_diffusion.tiny import EMBEDDED_NAME, make_subject_images, materialize_tiny_sdxl, resolve_pretrained

EXPECTED_IDS = [49406, 320, 1125, 539, 48136, 1929, 49407]  # "a photo of sks dog" with the real CLIP BPE


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are far below the size where intra-op threads pay off; on a busy 2-core box two OpenMP
    threads made a 2-step 64x64 generation take 2-3 s instead of 0.1 s. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_thread):
    """A fresh, empty TSD_CACHE and the pipeline materialized into it."""
    root = tmp_path_factory.mktemp("tsd_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TSD_CACHE", str(root))
        before = tiny.BUILD_COUNT
        d = materialize_tiny_sdxl()
        assert tiny.BUILD_COUNT == before + 1
        yield root, d


@pytest.fixture(scope="module")
def pipe(cache):
    from diffusers import StableDiffusionXLPipeline

    p = StableDiffusionXLPipeline.from_pretrained(resolve_pretrained(EMBEDDED_NAME), local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def test_materialize_layout_and_second_call_is_cached(cache):
    root, d = cache
    assert d.parent == root and d.name == "tiny-sdxl-v1"
    for f in ("model_index.json", "done", "tsd_tiny_sdxl.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
              "text_encoder_2/model.safetensors", "tokenizer/vocab.json", "tokenizer_2/vocab.json",
              "scheduler/scheduler_config.json"):
        assert (d / f).is_file(), f
    assert not list(root.glob(".tiny-sdxl-v1*.tmp-*")), "temp build dir left behind"
    info = json.loads((d / "tsd_tiny_sdxl.json").read_text())
    assert info["name"] == EMBEDDED_NAME and info["vocab_size"] == 49408
    mtime = (d / "done").stat().st_mtime_ns
    builds = tiny.BUILD_COUNT
    assert materialize_tiny_sdxl(cache_dir=root) == d
    assert resolve_pretrained(EMBEDDED_NAME) == str(d)
    assert tiny.BUILD_COUNT == builds and (d / "done").stat().st_mtime_ns == mtime


def test_loads_as_a_real_sdxl_pipeline(pipe, cache):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert cfg.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + te2.projection_dim
    assert pipe.vae_scale_factor * cfg.sample_size == 64  # default generation size 64x64
    assert pipe.tokenizer_2.pad_token == "!"
    # the saved weights are exactly a fresh build with the same seed (deterministic construction)
    fresh = tiny.build_tiny_sdxl_pipeline(cache[1] / "tokenizer", seed=0)
    for name in ("unet", "vae", "text_encoder_2"):
        a, b = getattr(fresh, name).state_dict(), getattr(pipe, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_generation_is_deterministic(pipe):
    def gen(seed):
        return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images

    a, b, c = gen(0), gen(0), gen(1)
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_tokenizer_ids(pipe):
    assert pipe.tokenizer("a photo of sks dog").input_ids == EXPECTED_IDS
    assert pipe.tokenizer_2("a photo of sks dog").input_ids == EXPECTED_IDS
    assert len(pipe.tokenizer) == 49408 and pipe.text_encoder.config.vocab_size == 49408


def test_dreambooth_step_on_subject_images(pipe, tmp_path):
    """data.py and the tiny base fit together: dataset -> collate -> VAE -> UNet with SDXL time ids -> backward."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    make_subject_images(tmp_path / "subject", n=3, size=96, seed=0)
    ds = DreamBoothDataset(tmp_path / "subject", "a photo of sks teapot", 64, center_crop=False, random_flip=True)
    batch = collate([ds[i] for i in range(len(ds))])
    unet = pipe.unet
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="t")
    try:
        with torch.no_grad():
            lat = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample(torch.Generator().manual_seed(0))
            lat = lat * pipe.vae.config.scaling_factor
            pe, _, pooled, _ = pipe.encode_prompt(batch["prompts"], device="cpu", do_classifier_free_guidance=False)
        assert lat.shape == (3, 4, 32, 32)
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(1))
        ts = torch.tensor([10, 500, 990])
        noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(lat, noise, ts)  # as the trainer does
        pred = unet(noisy, ts, encoder_hidden_states=pe,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": batch["time_ids"]}).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        grads = [p.grad for p in unet.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and torch.isfinite(loss)
    finally:
        unet.delete_adapters("t")


def test_atomic_build_replaces_leftovers(tmp_path, monkeypatch):
    root = tmp_path / "bare_cache"
    root.mkdir()
    monkeypatch.setenv("TSD_CACHE", str(root))
    (root / ".tiny-sdxl-v1-seed3.tmp-stale").mkdir()  # leftover of an interrupted build
    (root / "tiny-sdxl-v1-seed3").mkdir()  # an incomplete dir without the done marker
    (root / "tiny-sdxl-v1-seed3" / "junk").write_text("x")
    builds = tiny.BUILD_COUNT
    d = materialize_tiny_sdxl(seed=3)
    assert d == root / "tiny-sdxl-v1-seed3" and tiny.BUILD_COUNT == builds + 1
    assert not (d / "junk").exists() and not (root / ".tiny-sdxl-v1-seed3.tmp-stale").exists()
    assert materialize_tiny_sdxl(seed=3) == d and tiny.BUILD_COUNT == builds + 1


def test_resolve_pretrained_errors_and_passthrough(tmp_path):
    empty = tmp_path / "not_a_pipeline"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"not_a_pipeline is a directory but not a diffusers pipeline: it has no "
                                         r"model_index\.json"):
        resolve_pretrained(empty)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        resolve_pretrained(f)
    with pytest.raises(ValueError, match="neither an existing local directory nor a hub id"):
        resolve_pretrained(tmp_path / "missing" / "dir")
    with pytest.raises(ValueError, match="non-empty"):
        resolve_pretrained("")
    (empty / "model_index.json").write_text("{}")
    assert resolve_pretrained(empty) == str(empty)
    assert resolve_pretrained("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"


def test_subject_images_are_deterministic(tmp_path):
    a = make_subject_images(tmp_path / "a", n=4, size=96, seed=0)
    b = make_subject_images(tmp_path / "b", n=4, size=96, seed=0)
    c = make_subject_images(tmp_path / "c", n=4, size=96, seed=1)
    assert [p.name for p in a] == [f"subject_{i:02d}.png" for i in range(4)]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
    assert list_instance_images(tmp_path / "a") == a
    from PIL import Image

    imgs = [np.asarray(Image.open(p)) for p in a]
    assert all(i.shape == (96, 96, 3) for i in imgs)
    assert len({i.tobytes() for i in imgs}) == 4  # the views differ (position, scale, background, facing)
    for i in imgs:  # the subject's red stripes are in every view
        red = (i[..., 0] > 170) & (i[..., 1] < 80) & (i[..., 2] < 80)
        assert red.sum() > 50
