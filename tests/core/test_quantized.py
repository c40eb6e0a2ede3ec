"""Quantised bases (QLoRA): every method on a tiny LLaMA quantised to 4 bits (NF4, double quantisation) on the CPU by
transformers' ``BitsAndBytesConfig``, against dense references built from the dequantised weights.

What is checked: every method trains and its peft export reloads in stock peft (on the same 4-bit base, and on the
original fp32 one); the gradient statistics with respect to a quantised weight equal the dense reference's; the
dash switch takes its SVD from the dequantised weight, one layer dequantised at a time; the residualising inits
requantise their residual LoftQ-style and report its error; the native reload restores the requantised residual
bit for bit. Skipped without bitsandbytes.
"""

from __future__ import annotations

import weakref

import pytest
import torch

import shared
from shared import quantization
from shared.statistics import weight_gradients
from tests.helpers import LLAMA_TARGETS, NF4, dequantized_llama, lm_batches, quantized_llama, tiny_llama, train

pytest.importorskip("bitsandbytes", reason="the quantised-base tests need bitsandbytes (the 'quant' extra)")

SMALL = dict(r=2, alpha=4, target_modules=LLAMA_TARGETS, dash_warmup_steps=2, dash_directions=2, lora_init_steps=2,
             eva_max_batches=4, eva_rho=1.0, lora_da_num_samples=8, lora_da_population=8, lora_ga_batches=2)
RESIDUALISED = shared.methods.names(residualises_base=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("quantized")


def _cfg(method, **kw):
    return shared.AdapterConfig(method=method, **{**SMALL, **kw})


@torch.no_grad()
def _logits(model, batch):
    return model(**batch).logits


def _effective_weight(adapter, name):
    return adapter.original_weight(name) + adapter.delta_weight(name)


@pytest.mark.filterwarnings("ignore:EVA stopped")
@pytest.mark.parametrize("method", shared.METHODS)
def test_every_method_trains_on_4bit_and_its_export_reloads_in_stock_peft(method, root, tmp_path):
    from peft import PeftModel

    batches = lm_batches()
    model = quantized_llama(root)
    adapter = shared.attach(model, _cfg(method), data=batches, progress=False)
    before = float(model(**batches[0]).loss.detach())
    train(adapter, batches, steps=4)
    after = float(model(**batches[0]).loss.detach())
    assert after < before, (before, after)
    assert adapter.switched == adapter.config.uses_dash
    assert set(adapter.residual_errors()) == (set(adapter.layers) if method in RESIDUALISED else set())
    shared.export_lora(adapter, tmp_path, format="peft")

    # on the same 4-bit base, stock peft computes deq(Q(W)) + B'A': the trained model up to the residual's
    # requantisation error, which is exactly the recorded one
    base_4bit = quantized_llama(root)
    quantization.pin_layout(base_4bit)  # bitsandbytes' CPU inference repack fails on layers narrower than a block
    on_4bit = PeftModel.from_pretrained(base_4bit, tmp_path).eval()
    errors = adapter.residual_errors()
    for name in adapter.layers:
        layer = on_4bit.base_model.model.get_submodule(name)
        base = quantization.dequantized_weight(layer.get_base_layer()).float()
        stock = base + layer.get_delta_weight("default")
        gap = (stock - _effective_weight(adapter, name)).norm()
        if name in errors:
            residual = base - adapter.init_offset(name).product()
            torch.testing.assert_close(float(gap / residual.norm()), errors[name], rtol=1e-3, atol=1e-6)
        else:
            assert gap <= 1e-5 * stock.norm(), (name, float(gap))
    if not errors:
        assert (_logits(on_4bit, batches[0]) - _logits(model, batches[0])).abs().max() <= 1e-4

    # on the original fp32 base: a standard LoRA whose update is the trained one
    on_fp32 = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    for name in adapter.layers:
        delta = on_fp32.base_model.model.get_submodule(name).get_delta_weight("default")
        torch.testing.assert_close(delta, adapter.delta_weight(name), rtol=0, atol=1e-6)
    assert torch.isfinite(_logits(on_fp32, batches[0])).all()


def test_gradients_wrt_a_quantised_weight_equal_the_dense_reference(root):
    batches = lm_batches()
    model = quantized_llama(root)
    dense = dequantized_llama(model)
    layers = {n: model.get_submodule(n) for n, _ in quantization.quantized_layers(model)}
    assert len(layers) == 2 * 7
    got = weight_gradients(model, layers, batches, max_batches=3, progress=False)
    want = weight_gradients(dense, {n: dense.get_submodule(n) for n in layers}, batches, max_batches=3, progress=False)
    for name in layers:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.filterwarnings("ignore:EVA stopped")
@pytest.mark.parametrize("method", ["eva", "lora_da", "lora_init", "lora_ga", "pissa"])
def test_data_driven_inits_on_4bit_equal_the_dense_reference(method, root):
    """The factors come from activations (eva), gradients (lora_da, lora_init's gradient estimator, lora_ga) or the
    SVD of W (pissa, lora_init): on the 4-bit model they equal those on a dense model holding its dequantised W."""
    batches = lm_batches()
    model = quantized_llama(root)
    dense = dequantized_llama(model)
    cfg = _cfg(method, lora_init_estimator="gradient")
    got = shared.attach(model, cfg, data=batches, progress=False)
    want = shared.attach(dense, cfg, data=batches, progress=False)
    assert got.layers.keys() == want.layers.keys()
    for name in got.layers:
        for x, y in zip(got.lora_factors(name), want.lora_factors(name), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("method", RESIDUALISED)
def test_residualised_inits_requantise_loftq_style(method, double_quant, root):
    """Stored base = Q(deq(Q(W)) - γ₀B₀A₀) with the layer's own settings, and residual_errors() is its error."""
    import bitsandbytes as bnb

    bnb_cfg = {**NF4, "bnb_4bit_use_double_quant": double_quant}
    model = quantized_llama(root, **bnb_cfg)
    dequantized = {n: quantization.dequantized_weight(m).float() for n, m in quantization.quantized_layers(model)}
    adapter = shared.attach(model, _cfg(method), data=lm_batches(), progress=False)
    for name, layer in adapter.layers.items():
        base = layer.get_base_layer()
        state = base.weight.quant_state
        assert (state.quant_type, state.nested) == ("nf4", double_quant)
        residual = dequantized[name] - adapter.init_offset(name).product()
        codes, expected = bnb.functional.quantize_4bit(residual, blocksize=state.blocksize, quant_type="nf4",
                                                       compress_statistics=double_quant)
        assert torch.equal(base.weight.data, codes), name
        stored = bnb.functional.dequantize_4bit(codes, expected)
        assert torch.equal(quantization.dequantized_weight(base), stored), name
        error = float((stored - residual).norm() / residual.norm())
        assert adapter.residual_errors()[name] == pytest.approx(error, rel=1e-6)
        assert 0 < error < 0.5


@pytest.mark.parametrize("method", ["dash", "tsd", "pissa", "lora_ga"])
def test_native_reload_on_4bit_restores_the_requantised_residual_bit_for_bit(method, root, tmp_path):
    """"Exactly" on a quantised base: the reload quantises the same residual with the same settings, so the stored
    codes and scales, the dash directions, λ, A and B, and hence the logits, are bitwise the trained ones."""
    batches = lm_batches()
    model = quantized_llama(root)
    adapter = shared.attach(model, _cfg(method), data=batches, progress=False)
    train(adapter, batches, steps=3)
    shared.export_lora(adapter, tmp_path, format="tsd")
    loaded = shared.load(quantized_llama(root), tmp_path)
    for name, layer in adapter.layers.items():
        state, reloaded = layer.get_base_layer().state_dict(), loaded.layers[name].get_base_layer().state_dict()
        assert state.keys() == reloaded.keys()
        for key in state:
            assert torch.equal(state[key], reloaded[key]), (name, key)
        if adapter.config.uses_dash:
            assert torch.equal(adapter.dash_term(name).U, loaded.dash_term(name).U)
            assert torch.equal(adapter.dash_term(name).lam, loaded.dash_term(name).lam)
    assert loaded.residual_errors() == adapter.residual_errors()
    assert torch.equal(_logits(loaded.model, batches[0]), _logits(model, batches[0]))


def test_dash_switch_takes_its_svd_from_the_dequantised_weight_one_layer_at_a_time(root, monkeypatch):
    batches = lm_batches()
    model = quantized_llama(root)
    adapter = shared.attach(model, _cfg("dash"), data=batches, progress=False)
    train(adapter, batches, steps=1)
    alive, most = [], [0]
    real = quantization.dequantized_weight

    def tracked(module):
        out = real(module)
        alive[:] = [r for r in alive if r() is not None] + [weakref.ref(out)]
        most[0] = max(most[0], len(alive))
        return out

    monkeypatch.setattr(quantization, "dequantized_weight", tracked)
    train(adapter, batches, steps=1)  # the switch
    assert adapter.switched
    assert most[0] == 1
    monkeypatch.undo()
    for name in adapter.layers:
        W = quantization.dequantized_weight(adapter.layers[name].get_base_layer()).float()
        dash = adapter.dash_term(name)
        torch.testing.assert_close(dash.sigma, torch.linalg.svdvals(W), rtol=1e-5, atol=1e-6)
        idx = dash.indices
        residual = W @ dash.Vh.T - dash.U * dash.sigma[idx]
        assert residual.norm(dim=0).max() <= 1e-5 * float(dash.sigma.max()), name


@pytest.mark.parametrize("method", ["dash", "pissa", "lora_da"])
def test_8bit_bases_train_and_requantise(method, root):
    batches = lm_batches()
    model = quantized_llama(root, load_in_8bit=True)
    adapter = shared.attach(model, _cfg(method), data=batches, progress=False)
    before = float(model(**batches[0]).loss.detach())
    train(adapter, batches, steps=4)
    assert float(model(**batches[0]).loss.detach()) < before
    assert adapter.switched == adapter.config.uses_dash
    for name, error in adapter.residual_errors().items():
        assert 0 < error < 0.05, (name, error)  # int8 rows: far finer than NF4
