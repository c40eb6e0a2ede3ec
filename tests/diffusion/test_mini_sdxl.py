"""The mini SDXL building blocks and metrics (tsd_diffusion/mini_sdxl.py, tsd_diffusion/evaluation.py) against dense
references, what ships with it (a complete pipeline dir, the real CLIP tokenizers, the sample sets made from the base
itself), and the pretraining (tsd_diffusion/pretrain_mini.py): its UNet phase resumed from a checkpoint ends where an
uninterrupted run ends."""

import base64
import io
import json

import numpy as np
import pytest
import torch

from tsd_common.assets import asset_path
from tsd_diffusion import evaluation as ev
from tsd_diffusion import mini_sdxl as mini


def test_frechet_distance_matches_the_textbook_formula_and_the_population_value():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 1
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5])
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    mu = a.mean(0) - b.mean(0)
    # FID's textbook form, tr sqrtm(Σa Σb) = Σ sqrt(eigenvalues of Σa Σb) (real, >= 0), not the symmetric form used
    # by the implementation
    cross = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    expected = mu @ mu + ca.trace() + cb.trace() - 2 * cross
    assert ev.frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-9)
    # population value: |μ|² + Σ (σa - σb)² = 3 + (4 + 1 + 0) = 8
    assert ev.frechet_distance(a, b) == pytest.approx(8.0, rel=0.05)
    assert ev.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_nearest_rmse_matches_a_loop():
    g = torch.Generator().manual_seed(1)
    s, r = torch.rand(7, 3, 4, 4, generator=g) * 2 - 1, torch.rand(11, 3, 4, 4, generator=g) * 2 - 1
    best, where = ev.nearest_rmse(s, r, chunk=3)
    for i in range(len(s)):
        d = [(((s[i] + 1) / 2 - (r[j] + 1) / 2) ** 2).mean().sqrt() for j in range(len(r))]
        j = int(np.argmin(d))
        assert int(where[i]) == j and float(best[i]) == pytest.approx(float(d[j]), rel=1e-5)
    best, where = ev.nearest_rmse(r[[4, 2]], r)
    assert where.tolist() == [4, 2] and best.abs().max() < 1e-6


def test_classifier_round_trip_and_accuracy(tmp_path):
    torch.manual_seed(0)
    model = ev.SmallCNN(width=8).eval()
    ev.save_classifier(model, tmp_path, held_out_accuracy=0.5)
    loaded = ev.load_classifier(tmp_path)
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ev.logits(loaded, x), ev.logits(model, x), rtol=0, atol=0)
    pred = ev.logits(model, x).argmax(1)
    assert ev.class_accuracy(model, x, pred) == 1.0
    assert json.loads((tmp_path / ev.CLASSIFIER_CONFIG).read_text())["width"] == 8
    ev.save_classifier(model, tmp_path / "fp16", dtype=torch.float16)  # how the pretraining script ships it
    half = ev.load_classifier(tmp_path / "fp16")
    assert next(half.parameters()).dtype == torch.float32
    torch.testing.assert_close(ev.logits(half, x), ev.logits(model, x), rtol=1e-2, atol=1e-2)


def test_classifier_learns_a_separable_toy_problem():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(256) % 2
    x = torch.rand(256, 3, 32, 32, generator=g) * 0.2 - 0.1
    x[y == 1, 0] += 0.8  # class 1 is red
    model = ev.train_classifier(x, y, epochs=10, batch_size=32, width=8, progress=False)
    assert ev.class_accuracy(model, x, y) > 0.95


def _png(rgb):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), rgb, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_load_and_split_cifar_from_a_bigbench_task_file(tmp_path):
    task = tmp_path / "task.json"
    examples = [{"input": _png(10 * c), "target_scores": {k: int(k == name) for k in mini.CLASSES}}
                for c, name in enumerate(mini.CLASSES) for _ in range(3)]
    examples[4]["target_scores"] = str(examples[4]["target_scores"])  # some BIG-bench files store a repr string
    task.write_text(json.dumps({"examples": examples}))
    x, y = mini.load_cifar(task)
    assert x.shape == (30, 32, 32, 3) and x.dtype == np.uint8 and np.bincount(y).tolist() == [3] * 10
    assert (x[y == 7] == 70).all()
    xt, yt, xh, yh = mini.split_cifar(x, y)
    assert len(xt) == 30 and len(xh) == 0  # fewer than 900 per class: all train
    examples[5]["target_scores"] = {"unicorn": 1}
    task.write_text(json.dumps({"examples": examples}))
    with pytest.raises(ValueError, match="example 5"):
        mini.load_cifar(task)
    with pytest.raises(FileNotFoundError, match="BIG-bench"):
        mini.load_cifar(tmp_path / "missing.json")


def test_encode_latents_inverts_the_pipeline_decode_normalisation():
    torch.manual_seed(0)
    vae = mini.build_vae().eval()
    vae.register_to_config(scaling_factor=1.0, latents_mean=[0.5, -1.0, 0.0, 2.0], latents_std=[2.0, 0.5, 1.0, 3.0])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = mini.encode_latents(vae, x)
    # StableDiffusionXLPipeline: latents * latents_std / scaling_factor + latents_mean, then vae.decode
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z * std / vae.config.scaling_factor + mean, raw, rtol=1e-5, atol=1e-5)


def test_pretrain_unet_phase_resumes_exactly(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from shared.io import save_safetensors
    from tsd_diffusion import pretrain_mini as P

    def prepare(work):
        torch.manual_seed(0)
        mini.build_vae().save_pretrained(str(work / "vae"))
        g = torch.Generator().manual_seed(0)
        save_safetensors({"latents": torch.randn(40, 4, 16, 16, generator=g), "labels": torch.arange(40) % 10},
                         work / "latents.safetensors")
        return P.parse_args(["--cifar_task_json", str(work / "unused.json"), "--output_dir", str(work / "out"),
                             "--work_dir", str(work), "--unet_steps", "6",
                             "--unet_batch_size", "2", "--checkpointing_steps", "2"])

    full = prepare(tmp_path / "full")
    P.phase_unet(full)
    cut = prepare(tmp_path / "cut")
    lr = P._lr

    def interrupted(base, step, total, warmup, floor):
        if step == 3:
            raise KeyboardInterrupt
        return lr(base, step, total, warmup, floor)

    monkeypatch.setattr(P, "_lr", interrupted)
    with pytest.raises(KeyboardInterrupt):
        P.phase_unet(cut)
    assert json.loads((tmp_path / "cut" / "unet-checkpoint" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(P, "_lr", lr)
    P.phase_unet(cut)
    a = load_file(tmp_path / "full" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "cut" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    assert not (tmp_path / "cut" / "unet-checkpoint").exists()
    assert json.loads((tmp_path / "cut" / "unet.done.json").read_text())["steps"] == 6


CLIP_IDS = [49406, 320, 1125, 539, 48136, 1929, 49407]  # "a photo of sks dog" with the real CLIP BPE (open_clip's)


def test_mini_sdxl_ships_as_a_complete_pipeline_dir_with_the_real_clip_tokenizers(monkeypatch, tmp_path):
    """No cache, no download: the name resolves to the package dir, which stock diffusers loads with both tokenizers."""
    from diffusers import StableDiffusionXLPipeline

    from tsd_diffusion import tiny

    monkeypatch.setenv("TSD_CACHE", str(tmp_path / "empty-cache"))
    assert tiny.resolve_pretrained(mini.MINI_NAME) == str(mini.WEIGHTS_DIR)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(mini.WEIGHTS_DIR), local_files_only=True)
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.model_max_length == 77
    assert pipe.tokenizer("a photo of sks dog").input_ids == CLIP_IDS
    assert [t("a photo of sks dog").input_ids for t in mini.load_tokenizers()] == [CLIP_IDS, CLIP_IDS]
    assert not (tmp_path / "empty-cache").exists()
    monkeypatch.setattr(tiny, "WEIGHTS_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        tiny.resolve_pretrained(mini.MINI_NAME)


@pytest.mark.real_assets
def test_shipped_tokenizer_files_are_the_clip_bpe_of_open_clip():
    """Provenance: the shipped vocab.json and merges.txt are byte for byte what the clip_tokenizer asset builds from
    open_clip's bpe_simple_vocab_16e6.txt.gz (open-clip-torch==3.3.0)."""
    source = asset_path("clip_tokenizer")
    if source is None:
        pytest.skip("the clip_tokenizer asset is not fetched (python scripts/fetch_assets.py --only clip_tokenizer)")
    for sub in mini.TOKENIZER_DIRS:
        for f in ("vocab.json", "merges.txt"):
            assert (mini.WEIGHTS_DIR / sub / f).read_bytes() == (source / f).read_bytes(), (sub, f)


def test_shipped_sample_sets_cycle_the_classes_and_show_them():
    """The replay prior (captioned with the pretraining templates) and the reference gallery (one caption per class)
    hold every class equally, in cycling order, with seeds of their own, and the shipped classifier sees the
    prompted class in most of the gallery (guidance 5) and far above chance in the unguided prior (the
    pretraining's evaluation measured 0.337 unguided)."""
    clf = ev.load_classifier(mini.WEIGHTS_DIR / mini.EVALUATION_DIR)
    prior, labels, captions = mini.load_class_set(mini.WEIGHTS_DIR / mini.REPLAY_PRIOR_FILE)
    assert prior.dtype == torch.uint8 and prior.shape[1:] == (32, 32, 3) and len(prior) == len(captions) == 1000
    assert labels.tolist() == [i % 10 for i in range(1000)]
    assert captions[:10] == [f"a photo of a {c}" for c in mini.CLASSES] and captions[10] == "a airplane"
    gallery, glabels = mini.reference_images()
    assert gallery.shape == (1000, 3, 32, 32) and gallery.min() >= -1 and gallery.max() <= 1
    assert torch.equal(glabels, labels)
    assert not any(torch.equal(mini.to_tensor(prior[i:i + 1].numpy())[0], gallery[i]) for i in range(10))
    assert ev.class_accuracy(clf, mini.to_tensor(prior.numpy()), labels) >= 0.25  # chance: 0.1
    assert ev.class_accuracy(clf, gallery, glabels) >= 0.6


@pytest.mark.slow
@torch.no_grad()
def test_shipped_sample_sets_are_what_the_sampler_makes_from_the_shipped_base():
    """The first image of every class, redrawn with the same seeds by ``sample_class_set`` (what
    ``scripts/sample_mini_sdxl.py`` ran), matches the shipped files up to float noise across CPUs."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(mini.WEIGHTS_DIR), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for file, (seed, templates, guidance) in mini.SAMPLE_SETS.items():
        shipped, labels, captions = mini.load_class_set(mini.WEIGHTS_DIR / file)
        images, new_labels, new_captions = mini.sample_class_set(pipe, 1, seed, templates=templates,
                                                                 guidance=guidance, progress=False)
        assert new_captions == captions[:10] and new_labels.tolist() == labels[:10].tolist()
        diff = (torch.from_numpy(images).int() - shipped[:10].int()).abs().float()
        assert diff.mean() < 1.0 and diff.max() <= 24, (file, float(diff.mean()), float(diff.max()))


def test_subject_metrics_on_cases_with_a_known_answer():
    g = torch.Generator().manual_seed(3)
    subject = torch.rand(5, 3, 8, 8, generator=g) * 0.4 + 0.5  # bright images
    gallery = torch.rand(50, 3, 8, 8, generator=g) * 0.4 - 0.9  # dark images
    near_subject = (subject.repeat(4, 1, 1, 1) + 0.05 * torch.randn(20, 3, 8, 8, generator=g)).clamp(-1, 1)
    near_gallery = (gallery[:20] + 0.05 * torch.randn(20, 3, 8, 8, generator=g)).clamp(-1, 1)
    assert ev.subject_retrieval(near_subject, subject, gallery) == 1.0
    assert ev.subject_retrieval(near_gallery, subject, gallery) == 0.0
    assert ev.subject_retrieval(torch.cat([near_subject[:5], near_gallery[:15]]), subject, gallery) == 0.25
    assert ev.diversity(subject[:1].repeat(6, 1, 1, 1)) == pytest.approx(0.0, abs=1e-7)
    a, b = torch.full((1, 3, 8, 8), -1.0), torch.full((1, 3, 8, 8), 1.0)
    assert ev.diversity(torch.cat([a, b])) == pytest.approx(1.0)  # black vs white: RMSE 1 on [0, 1]
    torch.manual_seed(0)
    model = ev.SmallCNN(width=8).eval()
    assert ev.feature_similarity(model, subject, subject) > ev.feature_similarity(model, gallery, subject)
    with pytest.raises(ValueError, match="at least 2"):
        ev.diversity(subject[:1])


@torch.no_grad()
def test_shipped_mini_sdxl_draws_the_prompted_class(tmp_path):
    """The shipped weights (package data) load through the stock pipeline by name and draw what is asked for, as
    judged by the shipped evaluation classifier; the shipped files (weights, tokenizers, sample sets) stay under
    28 MB."""
    from diffusers import StableDiffusionXLPipeline

    from tsd_diffusion.tiny import resolve_pretrained

    shipped = sum(p.stat().st_size for p in mini.WEIGHTS_DIR.rglob("*") if p.is_file())
    assert shipped <= 28_000_000, shipped
    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_pretrained(mini.MINI_NAME), dtype=torch.float32,
                                                     local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    clf = ev.load_classifier(mini.WEIGHTS_DIR / mini.EVALUATION_DIR)
    hits = []
    for name in ("automobile", "horse", "ship"):
        images = pipe(f"a photo of a {name}", num_images_per_prompt=8, guidance_scale=7.5, num_inference_steps=20,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images * 2 - 1
        assert images.shape == (8, 3, 32, 32) and torch.isfinite(images).all()
        hits.append(ev.class_accuracy(clf, images, mini.CLASSES.index(name)))
    assert sum(hits) / len(hits) >= 0.6, hits  # chance: 0.1
