"""Bad input fails before any compute, with a message naming what is wrong."""

import pytest

import shared
from tests.helpers import LLAMA_TARGETS, lm_batches, tiny_llama


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-2), "r must be a positive integer"),
    (dict(dash_warmup_steps=-1), r"dash_warmup_steps \(t\) must be >= 0"),
    (dict(method="dash", dash_warmup_steps=0), "must be >= 1 for dash/tsd"),
    (dict(dash_directions=0), "dash_directions must be a positive integer"),
    (dict(method="dora"), "unknown method 'dora'"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(eva_rho=0.5), "eva_rho must be >= 1"),
    (dict(lora_init_estimator="oracle"), "lora_init_estimator"),
    (dict(target_modules=[]), "empty list"),
])
def test_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shared.AdapterConfig(**kwargs)


def test_too_many_dash_directions_names_the_layer():
    cfg = shared.AdapterConfig(method="dash", target_modules=LLAMA_TARGETS, dash_directions=40)
    with pytest.raises(ValueError, match=r"dash_directions=40 is larger than min\(out, in\) = min\(\d+, \d+\) = 32 "
                                         r"of target layer model\.layers\.0\."):
        shared.attach(tiny_llama(), cfg)


def test_rank_larger_than_weight_for_svd_inits():
    cfg = shared.AdapterConfig(method="pissa", r=40, alpha=40, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="r=40 is larger than min"):
        shared.attach(tiny_llama(), cfg)


def test_unknown_target_lists_linear_layer_names():
    cfg = shared.AdapterConfig(method="lora", target_modules=["qkv_proj"])
    with pytest.raises(ValueError, match=r"match no module.*down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj"):
        shared.attach(tiny_llama(), cfg)


@pytest.mark.parametrize("spelling", ["all-linear", ["all-linear"]])
def test_all_linear_adapts_every_linear_layer_but_the_output_embedding(spelling):
    """peft's shorthand; the LM head (get_output_embeddings) is left out, as peft does."""
    model = tiny_llama()
    adapter = shared.attach(model, shared.AdapterConfig(method="dash", r=2, target_modules=spelling))
    want = {f"model.layers.{i}.{part}.{t}" for i in range(2) for part, names in
            (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
            for t in names}
    assert set(adapter.layers) == want


@pytest.mark.parametrize("method", ["eva", "lora_da", "lora_init", "tsd", "lora_ga"])
def test_data_driven_init_needs_data(method):
    cfg = shared.AdapterConfig(method=method, r=2, alpha=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="needs data="):
        shared.attach(tiny_llama(), cfg)
    with pytest.raises(ValueError, match="data is empty"):
        shared.attach(tiny_llama(), cfg, data=[])


def test_model_is_untouched_when_attach_fails():
    model = tiny_llama()
    cfg = shared.AdapterConfig(method="dash", target_modules=LLAMA_TARGETS, dash_directions=40)
    with pytest.raises(ValueError):
        shared.attach(model, cfg)
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("method", ["lora_da", "lora_init", "lora_ga"])
def test_gradient_inits_explain_missing_labels(method):
    cfg = shared.AdapterConfig(method=method, r=2, alpha=4, target_modules=["q_proj"], lora_da_num_samples=4)
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in lm_batches()]
    with pytest.raises(ValueError, match="needs 'labels'"):
        shared.attach(tiny_llama(), cfg, data=batches)


def test_eva_needs_no_labels():
    cfg = shared.AdapterConfig(method="eva", r=2, alpha=4, target_modules=["q_proj"], eva_max_batches=4)
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in lm_batches()]
    adapter = shared.attach(tiny_llama(), cfg, data=batches)
    assert len(adapter.layers) == 2


def test_data_driven_inits_take_mapping_batches_such_as_batch_encoding():
    import torch
    from transformers import BatchEncoding

    cfg = shared.AdapterConfig(method="eva", r=2, alpha=4, target_modules=["q_proj"], eva_max_batches=4)
    batches = lm_batches()
    as_dicts = shared.attach(tiny_llama(), cfg, data=batches)
    as_encodings = shared.attach(tiny_llama(), cfg, data=[BatchEncoding(b) for b in batches])
    for name in as_dicts.layers:
        torch.testing.assert_close(as_encodings.lora_factors(name)[1], as_dicts.lora_factors(name)[1], atol=0, rtol=0)


def test_loading_a_non_tsd_file_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "tsd_adapter.safetensors")
    with pytest.raises(ValueError, match="not a tsd-lora native adapter"):
        shared.load(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter file not found"):
        shared.load(tiny_llama(), tmp_path / "missing")
