"""The dash switch: when it happens, what it selects (dense reference), and that it changes nothing."""

import pytest
import torch

import shared
from shared.layers import dense_weight
from tests.helpers import LLAMA_TARGETS, lm_batches, tiny_llama, train


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
        dash = adapter.dash_term(name)
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
    lams = torch.cat([layer.tsd_dash["default"].lam for layer in adapter.layers.values()])
    assert lams.abs().max() > 0
    # the dash term is what the model computes: remove it and the output moves
    out = model(**batches[1]).logits
    for layer in adapter.layers.values():
        layer.tsd_dash["default"].lam.data.zero_()
    assert (model(**batches[1]).logits - out).abs().max() > 1e-6


def test_lambda_gets_zero_gradient_before_switch():
    """λ is in the graph from step 0 (DDP needs every parameter used) but receives exactly zero gradient."""
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=10))
    model.train()
    model(**lm_batches()[0]).loss.backward()
    for layer in adapter.layers.values():
        assert layer.tsd_dash["default"].lam.grad is not None
        assert torch.count_nonzero(layer.tsd_dash["default"].lam.grad) == 0


def test_trainable_parameters_are_complete_from_step_zero():
    model = tiny_llama()
    adapter = shared.attach(model, _dash())
    params = {id(p) for p in adapter.trainable_parameters()}
    for layer in adapter.layers.values():
        assert id(layer.tsd_dash["default"].lam) in params
        assert id(layer.lora_A["default"].weight) in params and id(layer.lora_B["default"].weight) in params
        assert id(layer.tsd_dash["default"].U) not in params and not layer.tsd_dash["default"].U.requires_grad
    assert len(params) == 3 * len(adapter.layers)


def test_optimizer_state_for_lambda_is_reset_at_switch():
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=2))
    opt = train(adapter, lm_batches(), steps=2)
    for layer in adapter.layers.values():
        assert layer.tsd_dash["default"].lam not in opt.state
        assert layer.lora_A["default"].weight in opt.state


def test_bf16_base_keeps_adapter_fp32_and_switches():
    model = tiny_llama(dtype=torch.bfloat16)
    adapter = shared.attach(model, _dash(t=2))
    for layer in adapter.layers.values():
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        assert layer.lora_A["default"].weight.dtype == torch.float32
        assert layer.tsd_dash["default"].lam.dtype == torch.float32
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
    assert layer.tsd_dash["default"].U.shape[0] == W.shape[0] and layer.tsd_dash["default"].Vh.shape[1] == W.shape[1]
    x = torch.randn(3, W.shape[1])
    ref = x @ (W + adapter.delta_weight(name)).T + layer.get_base_layer().bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-5)


def _switched_layer(dropout=0.0):
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=1, dropout=dropout))
    train(adapter, lm_batches(), steps=3)  # λ has trained for 2 steps after the switch
    name, layer = next(iter(adapter.layers.items()))
    assert torch.count_nonzero(layer.tsd_dash["default"].lam) > 0
    return adapter, name, layer


def _dense_reference(adapter, name, layer, x):
    W = dense_weight(layer.get_base_layer()).detach()
    return x @ (W + adapter.delta_weight(name)).T


@pytest.mark.parametrize("safe", [True, False])
def test_peft_merge_and_unmerge_include_the_dash_term(safe):
    adapter, name, layer = _switched_layer()
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        ref = layer(x)
        W0 = layer.get_base_layer().weight.clone()
        layer.merge(safe_merge=safe)
        torch.testing.assert_close(layer.get_base_layer().weight, W0 + adapter.delta_weight(name), rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
        layer.unmerge()
        torch.testing.assert_close(layer.get_base_layer().weight, W0, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)


def test_mixed_adapter_batch_keeps_base_rows_base():
    """peft's ``adapter_names=``: "__base__" rows get W x only, adapter rows get the full update incl. dash."""
    adapter, name, layer = _switched_layer()
    x = torch.randn(4, 3, layer.in_features)
    with torch.no_grad():
        out = layer(x, adapter_names=["__base__", "default", "__base__", "default"])
        base = layer.get_base_layer()(x)
        torch.testing.assert_close(out[[0, 2]], base[[0, 2]], rtol=0, atol=0)
        torch.testing.assert_close(out[[1, 3]], _dense_reference(adapter, name, layer, x[[1, 3]]), rtol=1e-5,
                                   atol=1e-6)
        layer.enable_adapters(False)
        torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


def test_forward_and_gradients_match_the_dense_formula():
    adapter, name, layer = _switched_layer()
    x = torch.randn(2, 3, layer.in_features)
    dash = adapter.dash_term(name)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    params = (A, B, dash.lam)
    out = layer(x)
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g_out)
    W = dense_weight(layer.get_base_layer()).detach()
    ref = x @ (W + adapter.scale(name) * B @ A + (dash.U * dash.lam) @ dash.Vh).T
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, torch.autograd.grad(ref, params, g_out), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_dropout_draws_separate_masks_for_lora_and_dash():
    """With dropout on, LoRA and dash each call the dropout module (as the reference does)."""
    adapter, name, layer = _switched_layer(dropout=0.5)
    layer.train()
    x = torch.randn(6, layer.in_features)
    dash, drop = layer.tsd_dash["default"], layer.lora_dropout["default"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    base = layer.get_base_layer()(x)
    h1, h2 = drop(x), drop(x)
    assert not torch.equal(h1, h2)
    ref = base + adapter.scale(name) * h1 @ A.T @ B.T + ((h2 @ dash.Vh.T) * dash.lam) @ dash.U.T
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    layer.eval()  # dropout off: the folded single product
    torch.testing.assert_close(layer(x), _dense_reference(adapter, name, layer, x), rtol=1e-5, atol=1e-6)


def test_lambda_gets_a_zero_gradient_before_the_switch():
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=100))
    model(**lm_batches()[0]).loss.backward()
    for layer in adapter.layers.values():
        assert (layer.tsd_dash["default"].lam.grad is not None
                and torch.count_nonzero(layer.tsd_dash["default"].lam.grad) == 0)
        assert torch.count_nonzero(layer.lora_B["default"].weight.grad) > 0  # plain LoRA trains as usual


def test_merge_and_unload_reproduces_adapted_model():
    model = tiny_llama()
    adapter = shared.attach(model, _dash(t=2))
    batches = lm_batches()
    train(adapter, batches, steps=4)
    out = model(**batches[0]).logits
    merged = adapter.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(**batches[0]).logits, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 10.0])
def test_dash_lr_ratio_gives_lambda_its_own_learning_rate(ratio, tmp_path):
    """λ's group runs at ratio × lr: Adam's first step after the switch moves every λ_i by lr_λ (its update is
    lr · m̂/√v̂ = lr · sign(g) on a fresh state), while A and B keep lr; the ratio survives the native file."""
    lr = 1e-3
    adapter = shared.attach(tiny_llama(), _dash(t=2, dash_lr_ratio=ratio))
    groups = adapter.param_groups(lr, weight_decay=0.0)
    assert [g["lr"] for g in groups] == ([lr] if ratio == 1 else [lr, lr * ratio])
    assert sum(len(g["params"]) for g in groups) == len(adapter.trainable_parameters())
    opt = torch.optim.AdamW(groups, lr=lr, eps=1e-12)
    batches = lm_batches()
    for batch in batches[:3]:  # two steps to the switch, then one step that moves λ
        adapter.model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        adapter.step(opt)
    for name in adapter.dash_layers:
        lam = adapter.dash_term(name).lam.detach()
        moved = lam[lam != 0].abs()
        assert moved.numel() > 0, name
        torch.testing.assert_close(moved, torch.full_like(moved, lr * ratio), rtol=1e-3, atol=0)
    shared.export_lora(adapter, tmp_path, format="tsd")
    assert shared.load(tiny_llama(), tmp_path).config.dash_lr_ratio == ratio
    with pytest.raises(ValueError, match="dash_lr_ratio must be > 0"):
        _dash(dash_lr_ratio=0)
