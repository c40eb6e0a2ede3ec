"""The SDXL trainer's practitioner options on the tiny pipeline: EMA of the adapter (dense reference, exact resume,
export of the EMA model), the optimizers with λ's learning-rate ratio (the dash switch's λ state reset, resume),
the text-embedding cache (same training; the disk store's invalidation), the files' metadata (kohya file through
diffusers' kohya converter) and the DreamBooth paper's DINO / CLIP-I / CLIP-T metrics."""

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tsd_diffusion.train_sdxl as T
from shared.errors import InputError
from tests.helpers import kill_after_first_checkpoint, single_thread, train_tiny_sdxl  # noqa: F401
from tsd_common.training import read_loss_log


def images(pipe, prompt="a photo of sks teapot"):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), height=64, width=64,
                output_type="np").images


def record_optimizer(monkeypatch):
    """The run's optimizer, each inner step's parameters after it, and before each step whether λ has state."""
    seen = {"snapshots": [], "lam_state": []}
    original = T.make_optimizer

    def recording(config, adapters):
        optimizer, params = original(config, adapters)
        lams = [a.dash_term(n).lam for a in adapters.values() for n in a.dash_layers]
        seen.update(optimizer=optimizer, params=params, lams=lams)
        optimizer.register_step_pre_hook(lambda opt, a, k: seen["lam_state"].append(
            any(len(opt.state.get(lam, {})) > 0 for lam in lams)))
        optimizer.register_step_post_hook(lambda opt, a, k: seen["snapshots"].append(
            {id(p): p.detach().clone() for p in params}))
        return optimizer, params

    monkeypatch.setattr(T, "make_optimizer", recording)
    return seen


# ------------------------------------------------------------------------------------------------------- EMA
def test_ema_follows_diffusers_decay_per_optimizer_step_over_the_trainable_tensors(tmp_path, monkeypatch):
    seen = record_optimizer(monkeypatch)
    summary = train_tiny_sdxl(tmp_path / "ema", "--use_ema", "--ema_decay", "0.5", "--gradient_accumulation_steps",
                              "2", "--learning_rate", "1e-2", steps=6)
    ema = summary["ema"]
    assert ema.num_steps == 6 == len(seen["snapshots"])  # per optimizer step, not per micro-batch
    trainable = {id(p) for a in summary["adapters"].values() for p in a.trainable_parameters()}
    assert {id(p) for p in ema.parameters} == trainable  # LoRA A, B and λ; nothing frozen
    shadow = None
    for n, snap in enumerate(seen["snapshots"], start=1):
        k = n - 1
        d = 0.0 if k <= 0 else min(0.5, (1 + k) / (10 + k))
        shadow = dict(snap) if shadow is None else {i: d * shadow[i] + (1 - d) * snap[i] for i in snap}
    for p, s in zip(ema.parameters, ema.shadows().values(), strict=True):
        torch.testing.assert_close(s, shadow[id(p)], rtol=1e-5, atol=1e-7)
    lams = seen["lams"]
    assert any(s.abs().sum() > 0 for p, s in zip(ema.parameters, ema.shadows().values(), strict=True)
               if any(p is lam for lam in lams))  # λ is averaged after the switch


def test_ema_export_validation_and_non_ema_files(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from tsd_diffusion.mini_sdxl import to_uint8
    from tsd_diffusion.validation import generate

    out = tmp_path / "run"
    summary = train_tiny_sdxl(out, "--use_ema", "--ema_decay", "0.7", "--learning_rate", "1e-2", steps=6)
    unet = summary["adapters"]["unet"]
    trained = StableDiffusionXLPipeline.from_pretrained(summary["base"], unet=unet.model)
    raw = images(trained)
    with summary["ema"].applied():
        averaged = images(trained)
        valid = generate(trained, "a photo of sks teapot", 1, 0, 2, 64)
    assert np.abs(raw - averaged).max() > 1e-3  # the EMA is another model
    stock = StableDiffusionXLPipeline.from_pretrained(summary["base"])
    stock.load_lora_weights(str(out))
    assert np.abs(images(stock) - averaged).max() <= 1e-4  # the exported file is the EMA model
    non_ema = StableDiffusionXLPipeline.from_pretrained(summary["base"])
    non_ema.load_lora_weights(str(out / "non_ema"))
    assert np.abs(images(non_ema) - raw).max() <= 1e-4  # and the trained one is kept
    assert (out / "non_ema" / "tsd_state" / "unet" / "tsd_adapter.safetensors").is_file()
    saved = np.asarray(Image.open(out / "validation" / "step-6" / "prompt0-0.png"))
    assert np.abs(saved.astype(int) - to_uint8(valid)[0].astype(int)).max() <= 1  # validation used the EMA


def test_ema_resume_is_exact(tmp_path, monkeypatch):
    common = ["--use_ema", "--ema_decay", "0.8", "--checkpointing_steps", "2", "--dash_warmup_steps", "4",
              "--learning_rate", "1e-2"]
    full = train_tiny_sdxl(tmp_path / "full", *common, steps=6)
    restore = kill_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_tiny_sdxl(tmp_path / "killed", *common, steps=6)
    restore()
    assert (tmp_path / "killed" / "checkpoint-2" / "ema.safetensors").is_file()
    resumed = train_tiny_sdxl(tmp_path / "killed", *common, "--resume_from_checkpoint", "latest", steps=6)
    assert resumed["ema"].num_steps == 6
    for (name, a), b in zip(full["ema"].shadows().items(), resumed["ema"].shadows().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    train_tiny_sdxl(tmp_path / "plain", "--checkpointing_steps", "2", steps=3)
    with pytest.raises(InputError, match="holds no EMA state"):  # a checkpoint of a run without --use_ema
        train_tiny_sdxl(tmp_path / "plain", "--use_ema", "--resume_from_checkpoint", "latest", steps=4)


# ---------------------------------------------------------------------------------------- optimizers, λ's lr
OPTIMIZER_FLAGS = {
    "adamw": ["--optimizer", "adamw"],
    "adamw8bit": ["--optimizer", "adamw", "--use_8bit_adam"],
    "prodigy": ["--optimizer", "prodigy", "--learning_rate", "1.0", "--prodigy_safeguard_warmup", "false"],
    "adafactor": ["--optimizer", "adafactor"],
}
NEEDS = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}


@pytest.mark.parametrize("name", list(OPTIMIZER_FLAGS))
def test_optimizers_reset_lambda_state_and_keep_lambda_lr_ratio_through_a_resume(name, tmp_path, monkeypatch):
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"{NEEDS[name]} is not installed (pip install {NEEDS[name]})")
    common = [*OPTIMIZER_FLAGS[name], "--dash_lr_ratio", "10", "--checkpointing_steps", "2", "--dash_warmup_steps",
              "3", "--train_text_encoder"]
    seen = record_optimizer(monkeypatch)
    full = train_tiny_sdxl(tmp_path / "full", *common, steps=6)["adapters"]
    opt = seen["optimizer"]
    expected = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy", "adafactor": "Adafactor"}[name]
    assert type(opt).__name__ == expected
    # λ in groups of their own at 10x their component's lr (UNet, then each text encoder)
    lam_ids = {id(lam) for lam in seen["lams"]}
    kinds = [all(id(p) in lam_ids for p in g["params"]) for g in opt.param_groups]
    assert kinds == [False, True] * 3
    for main, lam in zip(opt.param_groups[0::2], opt.param_groups[1::2], strict=True):
        # Prodigy takes one lr for all groups: the ratio is carried by the update scale instead
        effective = [g["lr"] * g.get("update_scale", 1.0) for g in (main, lam)]
        assert effective[1] == pytest.approx(10 * effective[0])
    # λ's state exists before the switch (zero gradient), is dropped at it (after step 3), re-created after
    assert seen["lam_state"] == [False, True, True, False, True, True]
    assert all(full["unet"].dash_term(n).lam.abs().sum() > 0 for n in full["unet"].dash_layers)
    assert any(full[c].dash_term(n).lam.abs().sum() > 0 for c in ("text_encoder", "text_encoder_2")
               for n in full[c].dash_layers)
    restore = kill_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_tiny_sdxl(tmp_path / "killed", *common, steps=6)
    restore()
    resumed = train_tiny_sdxl(tmp_path / "killed", *common, "--resume_from_checkpoint", "latest", steps=6)["adapters"]
    logs = [read_loss_log(tmp_path / d) for d in ("killed", "full")]
    assert [(r["step"], r["loss"], r["lr"]) for r in logs[0]] == [(r["step"], r["loss"], r["lr"]) for r in logs[1]]
    for c in full:
        for layer in full[c].layers:
            torch.testing.assert_close(resumed[c].delta_weight(layer), full[c].delta_weight(layer), rtol=1e-5,
                                       atol=1e-6)


def test_scaled_group_updates_equal_a_group_learning_rate():
    """Prodigy's stand-in for per-group rates: scaling a group's update by c after the step equals running the group
    at c times the rate, for an optimizer whose update is linear in the rate (AdamW, decoupled weight decay)."""
    from tsd_diffusion.optimizers import scale_group_updates

    torch.manual_seed(0)
    a, b = torch.randn(5, 3), torch.randn(4)
    grads = [(torch.randn(5, 3), torch.randn(4)) for _ in range(4)]
    ref = [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())]
    got = [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())]
    opt_ref = torch.optim.AdamW([{"params": [ref[0]], "lr": 1e-2}, {"params": [ref[1]], "lr": 1e-1}], weight_decay=0.1)
    opt = torch.optim.AdamW([{"params": [got[0]], "lr": 1e-2}, {"params": [got[1]], "lr": 1e-2, "update_scale": 10.0}],
                            weight_decay=0.1)
    scale_group_updates(opt)
    for ga, gb in grads:
        for o, ps in ((opt_ref, ref), (opt, got)):
            ps[0].grad, ps[1].grad = ga.clone(), gb.clone()
            o.step()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


def test_resume_with_another_lambda_lr_ratio_is_refused(tmp_path):
    train_tiny_sdxl(tmp_path / "run", "--dash_lr_ratio", "10", "--checkpointing_steps", "2", steps=3)
    with pytest.raises(InputError, match=r"trained with --dash_lr_ratio 10.0, not 1.0"):
        train_tiny_sdxl(tmp_path / "run", "--resume_from_checkpoint", "latest", steps=4)


def test_prodigy_missing_is_named(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.raises(InputError, match=r"--optimizer prodigy needs prodigyopt: pip install prodigyopt"):
        train_tiny_sdxl(tmp_path / "bad", "--optimizer", "prodigy")


# ------------------------------------------------------------------------------------ text-embedding cache
def test_text_embedding_cache_trains_the_same(tmp_path):
    a = train_tiny_sdxl(tmp_path / "a", "--caption_dropout_rate", "0.3")["adapters"]["unet"]
    b = train_tiny_sdxl(tmp_path / "b", "--caption_dropout_rate", "0.3", "--cache_text_encoder_outputs_to_disk",
                        "--cache_latents")["adapters"]["unet"]
    assert (tmp_path / "b" / "cache" / "text_embeddings.safetensors").is_file()
    for name in a.layers:
        torch.testing.assert_close(a.delta_weight(name), b.delta_weight(name), rtol=1e-5, atol=1e-6)


def test_embedding_store_is_invalidated_by_the_base_and_the_captions(tmp_path):
    from tsd_diffusion.models import PromptConditioner, SDXLParts
    from tsd_diffusion.tiny import EMBEDDED_NAME, resolve_pretrained

    parts = SDXLParts(resolve_pretrained(EMBEDDED_NAME))
    store = tmp_path / "cache" / "text_embeddings.safetensors"
    first = PromptConditioner(parts, False, store)
    assert first.precompute(["a photo of sks teapot", "", "sks teapot on a table"]) == {"loaded": 0, "encoded": 3}
    again = PromptConditioner(parts, False, store)
    assert again.precompute(["a photo of sks teapot", "", "sks teapot on a table"]) == {"loaded": 3, "encoded": 0}
    for p in first.cache:
        for x, y in zip(first.cache[p], again.cache[p], strict=True):
            assert torch.equal(x, y)
    # a changed caption: only it is encoded; the stale one leaves the store
    assert PromptConditioner(parts, False, store).precompute(["a photo of sks teapot", "", "sks teapot in snow"]) == {
        "loaded": 2, "encoded": 1}
    from safetensors import safe_open

    with safe_open(str(store), framework="pt") as f:
        assert sorted(json.loads(f.metadata()["prompts"]).values()) == ["", "a photo of sks teapot",
                                                                         "sks teapot in snow"]
    # another base (a text encoder weight changed): nothing is reused
    with torch.no_grad():
        next(parts.text_encoders[1].parameters()).add_(1e-3)
    fresh = PromptConditioner(parts, False, store)
    assert fresh.precompute(["a photo of sks teapot", "", "sks teapot in snow"]) == {"loaded": 0, "encoded": 3}
    assert not torch.equal(fresh.cache["a photo of sks teapot"][1], again.cache["a photo of sks teapot"][1])


# ----------------------------------------------------------------------------------------------- metadata
def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_kohya_file_carries_metadata_and_loads_through_diffusers_kohya_converter(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "kohya"
    summary = train_tiny_sdxl(out, "--output_format", "kohya", "--train_text_encoder", "--text_encoder_lr", "1e-3",
                              "--learning_rate", "1e-2", steps=6)
    weights = out / "pytorch_lora_weights.safetensors"
    meta = _header(weights)
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "kohya" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.date"][:4].isdigit() and "T" in meta["modelspec.date"]
    assert meta["ss_network_dim"] == "6" and meta["ss_network_alpha"] == "6.0"  # the file's rank r + s = 4 + 2
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_steps"] == "6"
    assert meta["ss_sd_model_name"] == T.EMBEDDED_NAME
    args = json.loads(meta["ss_network_args"])
    assert (args["method"], args["rank"], args["dash_warmup_steps"], args["dash_directions"]) == ("dash", 4, 3, 2)
    # diffusers detects the kohya keys, converts them and reproduces the trained model
    state, _ = StableDiffusionXLPipeline.lora_state_dict(str(weights))
    assert state and not any(k.startswith("lora_unet_") for k in state)
    ad = summary["adapters"]
    trained = StableDiffusionXLPipeline.from_pretrained(
        summary["base"], unet=ad["unet"].model, text_encoder=ad["text_encoder"].model,
        text_encoder_2=ad["text_encoder_2"].model)
    stock = StableDiffusionXLPipeline.from_pretrained(summary["base"])
    stock.load_lora_weights(str(weights))
    assert np.abs(images(stock) - images(trained)).max() <= 1e-4


def test_diffusers_file_carries_the_same_facts_in_its_own_keys(tmp_path):
    out = tmp_path / "diffusers"
    train_tiny_sdxl(out, "--method", "lora", steps=2)
    meta = _header(out / "pytorch_lora_weights.safetensors")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.trigger_phrase"] == "a photo of sks teapot"
    facts = json.loads(meta["tsd_training"])
    assert (facts["method"], facts["rank"], facts["steps"], facts["base_model"]) == ("lora", 4, 2, T.EMBEDDED_NAME)
    assert "lora_adapter_metadata" in meta and not any(k.startswith("ss_") for k in meta)


# ---------------------------------------------------------------------------- DINO, CLIP-I, CLIP-T metrics
@pytest.fixture(scope="module")
def tiny_eval_models(tmp_path_factory):
    """Random-weight DINOv2 and CLIP models with their processors, saved as transformers dirs (real weights
    cannot be fetched here)."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTokenizer,
        Dinov2Config,
        Dinov2Model,
    )

    from tsd_diffusion.tiny import resolve_pretrained

    root = tmp_path_factory.mktemp("eval_models")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, image_size=32)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "dino")
    tokenizer = CLIPTokenizer.from_pretrained(resolve_pretrained(T.EMBEDDED_NAME), subfolder="tokenizer")
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    return root


def test_fidelity_metrics_match_a_dense_reference(tiny_eval_models):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

    from tsd_diffusion.fidelity import FidelityScorer, to_pil

    gen = torch.Generator().manual_seed(1)
    refs = [Image.fromarray((torch.rand(48, 40, 3, generator=gen) * 255).byte().numpy()) for _ in range(3)]
    samples = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    scorer = FidelityScorer(refs, dino=str(tiny_eval_models / "dino"), clip=str(tiny_eval_models / "clip"))
    got = scorer.score("a photo of sks dog", samples)

    dino, dproc = AutoModel.from_pretrained(tiny_eval_models / "dino"), AutoImageProcessor.from_pretrained(
        tiny_eval_models / "dino")
    clip = CLIPModel.from_pretrained(tiny_eval_models / "clip")
    cproc = AutoImageProcessor.from_pretrained(tiny_eval_models / "clip")
    tok = AutoTokenizer.from_pretrained(tiny_eval_models / "clip")
    gen_pil = to_pil(samples)
    with torch.no_grad():
        def cls(imgs):
            return [dino(pixel_values=dproc(images=[im], return_tensors="pt")["pixel_values"]).last_hidden_state[0, 0]
                    for im in imgs]

        def clip_img(imgs):
            out = []
            for im in imgs:
                pix = cproc(images=[im], return_tensors="pt")["pixel_values"]
                pooled = clip.vision_model(pixel_values=pix).pooler_output
                out.append(clip.visual_projection(pooled)[0])
            return out

        ids = tok(["a photo of sks dog"], return_tensors="pt")
        text = clip.text_projection(clip.text_model(**ids).pooler_output)[0]
        g_d, r_d, g_c, r_c = cls(gen_pil), cls(refs), clip_img(gen_pil), clip_img(refs)

    def cos(a, b):
        return float(F.cosine_similarity(a.double(), b.double(), dim=0))

    want = {"dino": sum(cos(a, b) for a in g_d for b in r_d) / 6,
            "clip_i": sum(cos(a, b) for a in g_c for b in r_c) / 6,
            "clip_t": sum(cos(a, text) for a in g_c) / 2}
    assert got == pytest.approx(want, abs=1e-5)


def test_validation_writes_sends_and_plots_fidelity_metrics(tmp_path, tiny_eval_models):
    pytest.importorskip("tensorboard", reason="the tracker check needs tensorboard (the dev extra installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    summary = train_tiny_sdxl(out, "--eval_dino_model", str(tiny_eval_models / "dino"), "--eval_clip_model",
                              str(tiny_eval_models / "clip"), "--validation_steps", "2", "--report_to", "tensorboard",
                              steps=4)
    for step in (2, 4):
        metrics = json.loads((out / "validation" / f"step-{step}" / "metrics.json").read_text())
        assert [m["prompt"] for m in metrics] == T.default_validation_prompts("a photo of sks teapot",
                                                                               T.EMBEDDED_NAME, True)
        for m in metrics:
            assert set(m) >= {"dino", "clip_i", "clip_t"} and all(-1 <= m[k] <= 1 for k in ("dino", "clip_i",
                                                                                             "clip_t"))
    assert summary["validation_metrics"][0]["dino"] == metrics[0]["dino"]
    assert (out / "validation" / "metrics.png").is_file()
    events = EventAccumulator(str(out / "logs" / "tsd-sdxl"))
    events.Reload()
    assert [e.step for e in events.Scalars("validation/prompt0/dino")] == [2, 4]
    from tsd_diffusion.compare import AdapterInfo

    assert AdapterInfo("run", out).validation_scores()[2:] == tuple(round(metrics[0][k], 3)
                                                                    for k in ("dino", "clip_i", "clip_t"))
