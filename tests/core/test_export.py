"""Export equivalence: every method, trained past the switch, reloaded by stock peft/diffusers on a fresh base."""

import json
import os
import stat

import pytest
import torch

import shared
from tests.helpers import BERT_TARGETS, LLAMA_TARGETS, cls_batches, lm_batches, tiny_bert, tiny_llama, tiny_unet, train

SMALL = dict(r=4, alpha=8, dash_warmup_steps=3, dash_directions=2, eva_max_batches=8, lora_da_num_samples=8,
             lora_init_steps=3, lora_ga_batches=2)


def _setup(kind, method, **kw):
    if kind == "llama":
        model, batches = tiny_llama(), lm_batches()
        cfg = shared.AdapterConfig(method=method, target_modules=LLAMA_TARGETS, **{**SMALL, **kw})
    else:
        model, batches = tiny_bert(), cls_batches()
        cfg = shared.AdapterConfig(method=method, target_modules=BERT_TARGETS, modules_to_save=["classifier"],
                                   **{**SMALL, **kw})
    return model, batches, cfg


def _fresh(kind):
    return tiny_llama() if kind == "llama" else tiny_bert()


def _out(model, batch):
    return model(**batch).logits


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("method", shared.METHODS)
def test_peft_export_reloads_exactly_in_stock_peft(kind, method, tmp_path):
    from peft import PeftModel

    model, batches, cfg = _setup(kind, method)
    adapter = shared.attach(model, cfg, data=batches)
    train(adapter, batches, steps=5)
    assert adapter.switched == cfg.uses_dash
    expected = _out(model, batches[0])
    shared.export_lora(adapter, tmp_path, format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # never a data-driven init name (peft would re-run it)
    reloaded = PeftModel.from_pretrained(_fresh(kind), tmp_path).eval()
    assert (_out(reloaded, batches[0]) - expected).abs().max() <= 1e-4
    if cfg.uses_dash or cfg.residualises_base:
        # the extra blocks are really there: dropping them changes the function
        folded_rank = max(reloaded.peft_config["default"].rank_pattern.values(),
                          default=reloaded.peft_config["default"].r)
        assert folded_rank > cfg.r


@pytest.mark.parametrize("method", ["dash", "tsd", "pissa", "eva"])
def test_native_format_round_trip_restores_training_state(method, tmp_path):
    model, batches, cfg = _setup("llama", method)
    adapter = shared.attach(model, cfg, data=batches)
    train(adapter, batches, steps=4)
    shared.export_lora(adapter, tmp_path, format="tsd")
    loaded = shared.load(_fresh("llama"), tmp_path)
    assert loaded.num_steps == adapter.num_steps == 4
    assert loaded.switched == adapter.switched
    torch.testing.assert_close(_out(loaded.model, batches[0]), _out(model, batches[0]), rtol=1e-5, atol=1e-5)
    for name, _layer in adapter.layers.items():
        if cfg.uses_dash:
            assert torch.equal(loaded.dash_term(name).indices, adapter.dash_term(name).indices)


def test_resume_from_native_equals_uninterrupted(tmp_path):
    """Stop before the switch, save, reload, continue across the switch: same weights as one long run."""
    model, batches, cfg = _setup("llama", "dash", dash_warmup_steps=4)
    full = shared.attach(model, cfg)
    opt = torch.optim.SGD(full.trainable_parameters(), lr=0.05)  # stateless optimizer: resume is exact
    train(full, batches, steps=7, optimizer=opt)

    model2, _, _ = _setup("llama", "dash", dash_warmup_steps=4)
    first = shared.attach(model2, cfg)
    train(first, batches[:2] * 3, steps=2, optimizer=torch.optim.SGD(first.trainable_parameters(), lr=0.05))
    shared.export_lora(first, tmp_path, format="tsd")
    resumed = shared.load(_fresh("llama"), tmp_path)
    assert not resumed.switched and resumed.num_steps == 2
    # continue with the batches the uninterrupted run saw from step 3 on
    rest = [batches[i % len(batches)] for i in range(2, 7)]
    train(resumed, rest, steps=5, optimizer=torch.optim.SGD(resumed.trainable_parameters(), lr=0.05))
    assert resumed.switched
    for name in full.layers:
        a, b = full.folded_factors(name), resumed.folded_factors(name)
        torch.testing.assert_close(a[1] @ a[0], b[1] @ b[0], rtol=1e-5, atol=1e-6)


def test_reload_restores_the_stored_directions_without_an_svd(tmp_path, monkeypatch):
    """The native file stores U_I, V_Iᵀ: a reload restores them bit for bit and runs no SVD (another device's SVD, or
    a degenerate σ, could give other vectors), only the singular-pair check against the base."""
    model, batches, cfg = _setup("llama", "dash")
    adapter = shared.attach(model, cfg)
    train(adapter, batches, steps=4)
    assert adapter.switched
    shared.export_lora(adapter, tmp_path, format="tsd")

    def no_svd(*args, **kwargs):
        raise AssertionError("the reload ran an SVD")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    loaded = shared.load(_fresh("llama"), tmp_path)
    for name in adapter.layers:
        mine, theirs = adapter.dash_term(name), loaded.dash_term(name)
        for key in ("U", "Vh", "lam", "indices", "sigma", "delta_sigma", "energy"):
            assert torch.equal(getattr(mine, key), getattr(theirs, key)), (name, key)


def test_format_1_files_still_load(tmp_path):
    """Files written before the directions and the init scale were stored: directions recomputed by SVD."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, batches, cfg = _setup("llama", "tsd")
    adapter = shared.attach(model, cfg, data=batches)
    train(adapter, batches, steps=4)
    shared.export_lora(adapter, tmp_path / "v2", format="tsd")
    with safe_open(str(tmp_path / "v2" / "tsd_adapter.safetensors"), "pt") as f:
        meta = {**f.metadata(), "tsd_format_version": "1"}
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith((".dash.U", ".dash.Vh", ".init_scale"))}
    (tmp_path / "v1").mkdir()
    save_file(tensors, str(tmp_path / "v1" / "tsd_adapter.safetensors"), metadata=meta)
    loaded = shared.load(_fresh("llama"), tmp_path / "v1")
    assert loaded.switched
    torch.testing.assert_close(_out(loaded.model, batches[0]), _out(model, batches[0]), rtol=1e-5, atol=1e-5)


def test_load_into_mismatched_base_names_module_and_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, batches, cfg = _setup("llama", "dash")
    adapter = shared.attach(model, cfg)
    shared.export_lora(adapter, tmp_path, format="tsd")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.\S+ has shape \(out, in\) = \(48, 64\) "
                                         r"in the model but \(32, 64\)"):
        shared.load(other, tmp_path)


def test_load_refuses_a_different_base_for_dash_directions(tmp_path):
    model, batches, cfg = _setup("llama", "dash")
    adapter = shared.attach(model, cfg)
    train(adapter, batches, steps=4)
    shared.export_lora(adapter, tmp_path, format="tsd")
    with pytest.raises(ValueError, match="not the same base model"):
        shared.load(tiny_llama(seed=123), tmp_path)


def test_export_writes_atomically_and_only_safetensors(tmp_path):
    model, batches, cfg = _setup("llama", "dash")
    adapter = shared.attach(model, cfg)
    for fmt in shared.FORMATS:
        shared.export_lora(adapter, tmp_path / fmt, format=fmt)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".tmp"))], files
    assert "adapter_model.safetensors" in files and "pytorch_lora_weights.safetensors" in files
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp_path.rglob("*"):
        if p.is_file():  # what open(path, "w") would give, not mkstemp's private 0600
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TARGET_SETS = {"attention": ATTENTION,
               "attention+proj+ff": [*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
               "attention+proj+ff+convs": [*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                                           "conv1", "conv2"]}


@pytest.mark.parametrize("fmt,targets,method", [(f, "attention", "dash") for f in ("diffusers", "kohya")]
                         + [("diffusers", t, "lora") for t in TARGET_SETS]
                         + [("diffusers", "attention+proj+ff", "dash")])
def test_unet_export_loads_in_stock_diffusers(fmt, targets, method, tmp_path):
    """A trained UNet adapter, exported and read back by diffusers' own LoRA loaders, for every target set (the mini
    SDXL study found that diffusers' ``convert_state_dict_to_diffusers`` mixes key formats once convs are targeted
    and ``load_lora_weights`` then silently drops the attention LoRAs; our export writes one format)."""
    from diffusers import StableDiffusionXLPipeline

    unet = tiny_unet()
    cfg = shared.AdapterConfig(method=method, r=4, alpha=8, target_modules=TARGET_SETS[targets],
                               dash_warmup_steps=2, dash_directions=2)
    g = torch.Generator().manual_seed(0)
    sample, enc, target = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g),
                           torch.randn(2, 4, 8, 8, generator=g))
    t = torch.tensor([10, 500])

    def forward_loss(model, _):
        return torch.nn.functional.mse_loss(model(sample, t, encoder_hidden_states=enc).sample, target)

    adapter = shared.attach(unet, cfg)
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    unet.train()
    for _ in range(4):
        forward_loss(unet, None).backward()
        opt.step()
        opt.zero_grad()
        adapter.step(opt)
    unet.eval()
    assert adapter.switched == (method == "dash")
    expected = unet(sample, t, encoder_hidden_states=enc).sample
    assert (expected - tiny_unet()(sample, t, encoder_hidden_states=enc).sample).abs().max() > 1e-2  # it trained
    shared.export_lora(adapter, tmp_path, format=fmt)
    state_dict, network_alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
        str(tmp_path), return_lora_metadata=True
    ) if fmt == "diffusers" else (
        *StableDiffusionXLPipeline.lora_state_dict(str(tmp_path), unet_config=tiny_unet().config), None)
    fresh = tiny_unet()
    StableDiffusionXLPipeline.load_lora_into_unet(state_dict, network_alphas=network_alphas, unet=fresh,
                                                   metadata=metadata)
    got = fresh(sample, t, encoder_hidden_states=enc).sample
    assert (got - expected).abs().max() <= 1e-4
