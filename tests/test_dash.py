"""The dash switch: when it happens, what it selects (dense reference), and that it changes nothing."""

import pytest
import torch
from conftest import LLAMA_TARGETS, lm_batches, tiny_llama, train

import shared
from shared.layers import dense_weight


def _dash(t=3, s=2, **kw):
    return shared.AdapterConfig(method="dash", r=4, alpha=8, target_modules=LLAMA_TARGETS, dash_warmup_steps=t,
                                dash_directions=s, **kw)


def test_switch_selects_brute_force_directions():
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=3, s=3))
    train(adapter, lm_batches(), steps=3)  # the switch runs inside the 3rd step(); λ is still 0
    assert adapter.switched
    for name, layer in adapter.layers.items():
        W = dense_weight(layer.get_base_layer()).detach().double()
        dW = adapter.scale(name) * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        dsig = torch.diagonal(U.T @ dW @ Vh.T)
        rate = dsig.abs() / (S + 1e-8)
        expect = torch.argsort(rate, descending=True)[:3]
        dash = layer.tsd_dash
        assert dash.indices.tolist() == expect.tolist(), name
        torch.testing.assert_close(dash.delta_sigma.double(), dsig, rtol=1e-4, atol=1e-6)
        # directions up to the joint sign: compare the rank-1 projectors u_i v_iᵀ
        for j, i in enumerate(expect.tolist()):
            torch.testing.assert_close(torch.outer(dash.U[:, j], dash.Vh[j]).double(),
                                       torch.outer(U[:, i], Vh[i]), rtol=1e-4, atol=1e-5)
        assert torch.count_nonzero(dash.lam) == 0


def test_switch_counts_optimizer_steps_not_micro_batches_or_eval():
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=4))
    batches = lm_batches()
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    for step in range(1, 5):
        for _ in range(3):  # gradient accumulation: 3 micro-batches per optimizer step
            model(**batches[0]).loss.backward()
        with torch.no_grad():  # eval passes in between never count
            for b in batches:
                model(**b)
        opt.step()
        opt.zero_grad()
        switched_now = adapter.step(opt)
        assert switched_now == (step == 4)
        assert adapter.switched == (step >= 4)
    assert adapter.num_steps == 4


def test_function_unchanged_at_switch_and_lambda_trains_after():
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=100))
    batches = lm_batches()
    train(adapter, batches, steps=3)
    before = model(**batches[1]).logits
    adapter.switch()
    torch.testing.assert_close(model(**batches[1]).logits, before, rtol=0, atol=0)
    train(adapter, batches, steps=3)
    lams = torch.cat([layer.tsd_dash.lam for layer in adapter.layers.values()])
    assert lams.abs().max() > 0
    # the dash term is what the model computes: remove it and the output moves
    out = model(**batches[1]).logits
    for layer in adapter.layers.values():
        layer.tsd_dash.lam.data.zero_()
    assert (model(**batches[1]).logits - out).abs().max() > 1e-6


def test_lambda_gets_zero_gradient_before_switch():
    """λ is in the graph from step 0 (DDP needs every parameter used) but receives exactly zero gradient."""
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=10))
    model.train()
    model(**lm_batches()[0]).loss.backward()
    for layer in adapter.layers.values():
        assert layer.tsd_dash.lam.grad is not None
        assert torch.count_nonzero(layer.tsd_dash.lam.grad) == 0


def test_trainable_parameters_are_complete_from_step_zero():
    model = tiny_llama()
    adapter = shared.attach(model, _dash())
    params = {id(p) for p in adapter.trainable_parameters()}
    for layer in adapter.layers.values():
        assert id(layer.tsd_dash.lam) in params
        assert id(layer.lora_A["default"].weight) in params and id(layer.lora_B["default"].weight) in params
        assert id(layer.tsd_dash.U) not in params and not layer.tsd_dash.U.requires_grad
    assert len(params) == 3 * len(adapter.layers)


def test_optimizer_state_for_lambda_is_reset_at_switch():
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=2))
    opt = train(adapter, lm_batches(), steps=2)
    for layer in adapter.layers.values():
        assert layer.tsd_dash.lam not in opt.state
        assert layer.lora_A["default"].weight in opt.state


def test_bf16_base_keeps_adapter_fp32_and_switches():
    model = tiny_llama(dtype=torch.bfloat16)
    adapter = shared.attach(model, _dash(t=2))
    for layer in adapter.layers.values():
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        assert layer.lora_A["default"].weight.dtype == torch.float32
        assert layer.tsd_dash.lam.dtype == torch.float32
    train(adapter, lm_batches(), steps=4)
    assert adapter.switched
    assert torch.isfinite(model(**lm_batches()[0]).logits.float()).all()


def test_fan_in_fan_out_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    cfg = shared.AdapterConfig(method="dash", r=4, alpha=8, target_modules=["c_attn", "c_fc"], dash_warmup_steps=2,
                               dash_directions=2)
    adapter = shared.attach(model, cfg)
    batches = lm_batches()
    train(adapter, batches, steps=4)
    name, layer = next(iter(adapter.layers.items()))
    W = layer.get_base_layer().weight.detach().T  # Conv1D stores in × out
    assert layer.tsd_dash.U.shape[0] == W.shape[0] and layer.tsd_dash.Vh.shape[1] == W.shape[1]
    x = torch.randn(3, W.shape[1])
    ref = x @ (W + adapter.delta_weight(name)).T + layer.get_base_layer().bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-5)


def test_peft_merge_with_active_dash_is_refused_not_silently_wrong():
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=1))
    train(adapter, lm_batches(), steps=2)
    layer = next(iter(adapter.layers.values()))
    layer.merge()
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        layer(torch.randn(2, layer.in_features))


def test_merge_and_unload_reproduces_adapted_model():
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=2))
    batches = lm_batches()
    train(adapter, batches, steps=4)
    out = model(**batches[0]).logits
    merged = adapter.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(**batches[0]).logits, out, rtol=1e-4, atol=1e-5)
