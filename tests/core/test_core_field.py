"""Core correctness under settings the other fixtures do not use (issue 24): peft's own conversion, named and
multiple adapters, rank-deficient weights, peft's merge, runtime LoRA scales, bit-exact reloads, DDP buffers,
skipped fp16 steps, ZeRO-style optimizer state, half-precision bases. Every test runs the public path
(``shared.attach``/``load``/``export_lora``, stock peft/diffusers); the statistics engine's are in
``test_statistics_field.py``."""

import pytest
import torch
from torch import nn

import shared
from shared import tsd
from tests.helpers import LLAMA_TARGETS, lm_batches, mse, tiny_llama, train


# ------------------------------------------------------------------------------ 3. peft's own LoRA conversion
def test_peft_conversion_refuses_dash_instead_of_dropping_the_term():
    from peft.tuners.lora.conversion import convert_to_lora

    model = tiny_llama()
    adapter = shared.attach(model, shared.AdapterConfig(method="dash", r=4, alpha=8, target_modules=["q_proj"],
                                                        dash_warmup_steps=1, dash_directions=2))
    train(adapter, lm_batches(), steps=2)
    assert adapter.switched
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(model, rank=6)
    plain = tiny_llama()
    shared.attach(plain, shared.AdapterConfig(method="lora", r=4, alpha=8, target_modules=["q_proj"]))
    convert_to_lora(plain, rank=4)  # plain LoRA still converts


# ------------------------------------------------------------------------------ 4. named and multiple adapters
def _dash_cfg(**kw):
    return shared.AdapterConfig(**{**dict(method="dash", r=4, alpha=8, target_modules=LLAMA_TARGETS,
                                          dash_warmup_steps=2, dash_directions=2), **kw})


@torch.no_grad()
def _logits(model, batch):
    return model(**batch).logits


def test_two_named_adapters_train_export_and_reload(tmp_path):
    from peft import PeftModel

    batches = lm_batches()
    model = tiny_llama()
    first = shared.attach(model, _dash_cfg(), adapter_name="first")
    train(first, batches, steps=4)
    kept = {n: (first.dash_term(n).U.clone(), first.dash_term(n).indices.clone()) for n in first.layers}
    second = shared.attach(model, _dash_cfg(seed=1, r=2, target_modules=["q_proj", "v_proj"]), adapter_name="second")
    assert {id(p) for p in second.trainable_parameters()}.isdisjoint(map(id, first.trainable_parameters()))
    train(second, batches[1:], steps=4)
    assert first.switched and second.switched
    for n, (U, idx) in kept.items():  # the second adapter's switch left the first one's directions alone
        assert torch.equal(first.dash_term(n).U, U) and torch.equal(first.dash_term(n).indices, idx)

    outs = {}
    for adapter in (first, second):
        adapter.activate()
        outs[adapter.adapter_name] = _logits(model, batches[0])
        shared.export_lora(adapter, tmp_path / adapter.adapter_name / "peft", format="peft")
        shared.export_lora(adapter, tmp_path / adapter.adapter_name / "tsd", format="tsd")
    assert (outs["first"] - outs["second"]).abs().max() > 1e-3

    fresh = tiny_llama()
    loaded = {n: shared.load(fresh, tmp_path / n / "tsd", adapter_name=n) for n in ("first", "second")}
    for name, adapter in loaded.items():
        adapter.activate()
        torch.testing.assert_close(_logits(fresh, batches[0]), outs[name], rtol=0, atol=1e-6)
        stock = PeftModel.from_pretrained(tiny_llama(), tmp_path / name / "peft").eval()
        torch.testing.assert_close(_logits(stock, batches[0]), outs[name], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="already holds an adapter named 'first'"):
        shared.attach(model, _dash_cfg(), adapter_name="first")


def test_residualising_methods_need_layers_of_their_own():
    """A residualised base is what every adapter of the layer computes on, active or not: refused both ways."""
    batches = lm_batches()
    model = tiny_llama()
    shared.attach(model, _dash_cfg(target_modules=["q_proj"]), adapter_name="a")
    with pytest.raises(ValueError, match="method 'pissa' changes its base weight"):
        shared.attach(model, _dash_cfg(method="pissa", target_modules=["q_proj"]), adapter_name="b")
    shared.attach(model, _dash_cfg(method="pissa", target_modules=["v_proj"]), adapter_name="c")  # other layers: fine
    with pytest.raises(ValueError, match="one of them changes its base weight"):
        shared.attach(model, _dash_cfg(target_modules=["v_proj"]), data=batches, adapter_name="d")


def test_merge_and_unload_refuses_to_drop_another_adapter():
    model = tiny_llama()
    shared.attach(model, _dash_cfg(), adapter_name="a")
    b = shared.attach(model, _dash_cfg(), adapter_name="b")
    with pytest.raises(ValueError, match=r"also holds adapter\(s\) \['a'\]"):
        b.merge_and_unload()


# ------------------------------------------------------------------------------ 5. rank-deficient weights
class _LowRank(nn.Module):
    """x -> fc (24 × 20, rank 6: 14 numerically null directions) -> tanh -> out; MSE loss."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc, self.out = nn.Linear(20, 24), nn.Linear(24, 5)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(24, 6, generator=g) @ torch.randn(6, 20, generator=g) / 4)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)))


def _fp64_selection(W, P, Q, s):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    rate = tsd.change_rate(S, tsd.delta_sigma(U, Vh, P.double(), Q.double()))
    return U, S, Vh, tsd.select_directions(rate, s, tsd.non_null(S, W.shape))


def test_dash_never_selects_numerically_null_directions():
    model = _LowRank()
    adapter = shared.attach(model, shared.AdapterConfig(method="dash", r=4, alpha=8, target_modules=["fc"],
                                                        dash_warmup_steps=3, dash_directions=4))
    data = [(torch.randn(8, 20, generator=torch.Generator().manual_seed(i)), torch.randn(8, 5)) for i in range(3)]
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=5e-2)
    for x, y in data:
        mse(model, (x, y)).backward()
        opt.step()
        opt.zero_grad()
        adapter.step(opt)
    assert adapter.switched
    W = adapter.original_weight("fc")
    U, S, Vh, expected = _fp64_selection(W, *adapter.update_factors("fc"), 4)
    assert int(tsd.non_null(S, W.shape).sum()) == 6
    dash = adapter.dash_term("fc")
    assert dash.indices.tolist() == expected.tolist() and all(i < 6 for i in dash.indices.tolist())
    for j, i in enumerate(expected.tolist()):  # fp32 and fp64 agree on the subspace (projectors u_i v_iᵀ)
        torch.testing.assert_close(torch.outer(dash.U[:, j], dash.Vh[j]).double(), torch.outer(U[:, i], Vh[i]),
                                   rtol=0, atol=1e-4)


def test_dash_leaves_slots_empty_when_fewer_directions_than_s():
    model = _LowRank()
    adapter = shared.attach(model, shared.AdapterConfig(method="dash", r=4, alpha=8, target_modules=["fc"],
                                                        dash_warmup_steps=1, dash_directions=9))
    x, y = torch.randn(8, 20), torch.randn(8, 5)
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=5e-2)
    for _ in range(3):
        mse(model, (x, y)).backward()
        opt.step()
        opt.zero_grad()
        adapter.step(opt)
    dash = adapter.dash_term("fc")
    assert dash.indices[:6].ge(0).all() and dash.indices[6:].eq(-1).all()
    assert torch.count_nonzero(dash.U[:, 6:]) == 0 and torch.count_nonzero(dash.lam[6:]) == 0
    assert torch.count_nonzero(dash.lam[:6]) > 0  # the filled slots trained


def test_lora_init_does_not_initialise_from_null_directions():
    model = _LowRank()
    data = [(torch.randn(8, 20, generator=torch.Generator().manual_seed(i)), torch.randn(8, 5)) for i in range(2)]
    cfg = shared.AdapterConfig(method="lora_init", r=8, alpha=8, target_modules=["fc"], lora_init_estimator="gradient",
                               lora_init_steps=2)
    W0 = model.fc.weight.detach().clone()
    adapter = shared.attach(model, cfg, data=data, forward_fn=mse, progress=False)
    B, A = adapter.lora_factors("fc")
    assert torch.count_nonzero(B[:, 6:]) == 0 and torch.count_nonzero(B[:, :6].norm(dim=0)) == 6
    assert torch.count_nonzero(A[6:]) > 0  # peft's default init: those slots train as plain LoRA
    torch.testing.assert_close(adapter.scale("fc") * B @ A, W0, rtol=0, atol=1e-5)  # the whole rank-6 W moved
    torch.testing.assert_close(model.fc.get_base_layer().weight, torch.zeros_like(W0), rtol=0, atol=1e-5)


def test_load_refuses_a_base_with_the_same_singular_values_but_other_vectors(tmp_path):
    """Q W has W's singular values but other left singular vectors: the old σ-only check let it through."""
    model, batches = tiny_llama(), lm_batches()
    adapter = shared.attach(model, _dash_cfg(target_modules=["q_proj"]))
    train(adapter, batches, steps=3)
    shared.export_lora(adapter, tmp_path, format="tsd")
    other = tiny_llama()
    with torch.no_grad():
        for name in adapter.layers:
            w = other.get_submodule(name).weight
            Q, _ = torch.linalg.qr(torch.randn(w.shape[0], w.shape[0], generator=torch.Generator().manual_seed(1)))
            w.copy_(Q @ w)
    with pytest.raises(ValueError, match="not singular vectors of the model's weight"):
        shared.load(other, tmp_path)


# ------------------------------------------------------------------------------ 6. merge_and_unload after merge()
def test_merge_and_unload_after_peft_merge_adds_the_update_once():
    model, batches = tiny_llama(), lm_batches()
    adapter = shared.attach(model, _dash_cfg())
    train(adapter, batches, steps=4)
    expected = _logits(model, batches[0])
    for layer in adapter.layers.values():
        layer.merge()
    torch.testing.assert_close(_logits(model, batches[0]), expected, rtol=0, atol=1e-5)
    merged = adapter.merge_and_unload()
    torch.testing.assert_close(_logits(merged, batches[0]), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ 7. runtime LoRA scale
def _set_scale(model, factor):
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.scaling:
                module.set_scale(name, factor)


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.7])
def test_runtime_scale_scales_the_dash_term_like_peft_scales_the_export(factor, tmp_path):
    from peft import PeftModel

    base, batches = tiny_llama(), lm_batches()
    model = tiny_llama()
    adapter = shared.attach(model, _dash_cfg(dash_warmup_steps=1))
    train(adapter, batches, steps=3)
    shared.export_lora(adapter, tmp_path, format="peft")
    _set_scale(model, factor)
    live = _logits(model, batches[0])
    stock = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    _set_scale(stock, factor)
    torch.testing.assert_close(live, _logits(stock, batches[0]), rtol=0, atol=1e-4)
    if factor == 0.0:
        torch.testing.assert_close(live, _logits(base, batches[0]), rtol=0, atol=1e-5)
    for name, layer in adapter.layers.items():  # peft's merge at a runtime scale includes the scaled dash term
        W = layer.get_base_layer().weight.detach().clone()
        dense = W + factor * adapter.delta_weight(name)
        layer.merge()
        torch.testing.assert_close(layer.get_base_layer().weight, dense, rtol=0, atol=1e-6)
        layer.unmerge()


def test_diffusers_cross_attention_scale_matches_the_stock_loaded_export(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from tests.helpers import tiny_unet

    unet = tiny_unet()
    adapter = shared.attach(unet, _dash_cfg(target_modules=["to_q", "to_k", "to_v", "to_out.0"], dash_warmup_steps=1))
    g = torch.Generator().manual_seed(0)
    sample, states, t = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g),
                         torch.tensor([10, 500]))
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        unet(sample, t, states).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        adapter.step(opt)
    assert adapter.switched and any(torch.count_nonzero(adapter.dash_term(n).lam) for n in adapter.layers)
    shared.export_lora(adapter, tmp_path, format="diffusers")
    stock = tiny_unet()
    state_dict, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    StableDiffusionXLPipeline.load_lora_into_unet(state_dict, network_alphas=alphas, unet=stock, metadata=metadata)
    with torch.no_grad():
        for scale in (0.0, 0.3):
            live = unet(sample, t, states, cross_attention_kwargs={"scale": scale}).sample
            torch.testing.assert_close(live, stock(sample, t, states, cross_attention_kwargs={"scale": scale}).sample,
                                       rtol=0, atol=1e-5)
        torch.testing.assert_close(unet(sample, t, states, cross_attention_kwargs={"scale": 0.0}).sample,
                                   tiny_unet()(sample, t, states).sample, rtol=0, atol=1e-5)


def test_runtime_scale_does_not_change_the_original_weight_or_the_export():
    model, batches = tiny_llama(), lm_batches()
    adapter = shared.attach(model, _dash_cfg(method="tsd", lora_init_steps=2, target_modules=["q_proj"]), data=batches)
    W0 = {n: tiny_llama().get_submodule(n).weight.detach() for n in adapter.layers}
    before = {n: adapter.delta_weight(n) for n in adapter.layers}
    _set_scale(model, 0.25)
    for name in adapter.layers:
        torch.testing.assert_close(adapter.original_weight(name), W0[name], rtol=0, atol=1e-5)
        torch.testing.assert_close(adapter.delta_weight(name), before[name], rtol=0, atol=0)


# ------------------------------------------------------------------------------ 9. bit-exact native reload
@pytest.mark.parametrize("method", ["lora_init", "tsd", "pissa", "lora_ga"])
def test_native_reload_of_residualised_methods_is_bit_exact(method, tmp_path):
    batches = lm_batches()
    model = tiny_llama()
    cfg = _dash_cfg(method=method, r=3, alpha=5, lora_init_steps=2, lora_ga_batches=2)  # γ = 5/3: rounding shows
    adapter = shared.attach(model, cfg, data=batches)
    train(adapter, batches, steps=3)
    shared.export_lora(adapter, tmp_path, format="tsd")
    loaded = shared.load(tiny_llama(), tmp_path)
    for name, layer in adapter.layers.items():
        assert torch.equal(loaded.layers[name].get_base_layer().weight, layer.get_base_layer().weight), name
    assert torch.equal(_logits(loaded.model, batches[0]), _logits(model, batches[0]))


# ------------------------------------------------------------------------------ 10. DDP buffers
def test_dash_diagnostics_are_not_broadcast_by_ddp(tmp_path):
    import torch.distributed as dist

    model, batches = tiny_llama(), lm_batches()
    adapter = shared.attach(model, _dash_cfg(dash_warmup_steps=1))
    train(adapter, batches, steps=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert not [n for n in ddp.named_module_buffers if "tsd" in n]
        loss = ddp(**batches[0]).loss
        loss.backward()
    finally:
        dist.destroy_process_group()
    for name in adapter.layers:  # the switch diagnostics are still there
        d, shape = adapter.dash_term(name), adapter.original_weight(name).shape
        assert d.indices.numel() == 2 and d.sigma.numel() == min(shape) and d.energy.numel() == 2


def test_model_state_dict_round_trip_restores_an_active_dash_term():
    model, batches = tiny_llama(), lm_batches()
    adapter = shared.attach(model, _dash_cfg(dash_warmup_steps=1))
    train(adapter, batches, steps=3)
    fresh = tiny_llama()
    shared.attach(fresh, _dash_cfg(dash_warmup_steps=1))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_logits(fresh, batches[0]), _logits(model, batches[0]))


# ------------------------------------------------------------------------------ checks: skipped steps, ZeRO, signs
def test_an_fp16_step_skipped_by_the_grad_scaler_does_not_count_towards_the_switch():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    # the state AcceleratedOptimizer reads; accelerate refuses fp16 on a CPU, so the scaler is ours
    Accelerator(cpu=True)
    model, batches = tiny_llama(), lm_batches()
    adapter = shared.attach(model, _dash_cfg(dash_warmup_steps=3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = AcceleratedOptimizer(torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2), device_placement=False,
                               scaler=scaler)
    switched = []
    for step in range(5):
        loss = model(**batches[step]).loss
        scaler.scale(loss).backward()
        if step == 1:  # an fp16 overflow: the scaler skips this optimizer step
            next(iter(adapter.trainable_parameters())).grad.fill_(float("inf"))
        opt.step()
        opt.zero_grad()
        switched.append(adapter.step(opt))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert opt.step_was_skipped is False
    assert switched == [False, False, False, True, False]
    assert (adapter.num_steps, adapter.num_updates) == (5, 4)


def test_an_optimizer_state_not_keyed_by_parameter_warns_at_the_switch():
    """DeepSpeed ZeRO-1/2 keeps Adam's state per flat partition: λ's state cannot be dropped there; say so."""
    model, batches = tiny_llama(), lm_batches()
    adapter = shared.attach(model, _dash_cfg(dash_warmup_steps=2))
    params = adapter.trainable_parameters()
    flat = nn.Parameter(torch.cat([p.detach().flatten() for p in params]))
    opt = torch.optim.AdamW([flat], lr=1e-3)
    for step in range(2):
        model(**batches[step]).loss.backward()
        flat.grad = torch.cat([p.grad.flatten() for p in params])
        opt.step()
        opt.zero_grad()
        model.zero_grad()
        if step == 1:
            with pytest.warns(UserWarning, match="not keyed by this adapter's parameters"):
                assert adapter.step(opt)
        else:
            adapter.step(opt)


def test_the_dash_term_is_invariant_to_a_joint_sign_flip():
    """What canonical_signs' docstring states: flipping (u_i, v_i) together changes no output."""
    model, batches = tiny_llama(), lm_batches()
    adapter = shared.attach(model, _dash_cfg(dash_warmup_steps=1))
    train(adapter, batches, steps=3)
    expected = _logits(model, batches[0])
    with torch.no_grad():
        for name in adapter.layers:
            d = adapter.dash_term(name)
            d.U[:, 0].neg_()
            d.Vh[0].neg_()
    torch.testing.assert_close(_logits(model, batches[0]), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ checks: half precision
@pytest.mark.parametrize("method", ["lora_init", "eva", "lora_da"])
def test_init_factors_are_written_in_fp32_on_a_bf16_base(method):
    """The adapter is cast to fp32 before an init writes its fp32 factors (not rounded to bf16 on the way)."""
    cfg = shared.AdapterConfig(method=method, r=4, alpha=8, target_modules=["q_proj", "v_proj"], lora_init_steps=2,
                               lora_init_estimator="gradient", eva_max_batches=4, lora_da_num_samples=8,
                               lora_da_population=8)
    adapter = shared.attach(tiny_llama(dtype=torch.bfloat16), cfg, data=lm_batches(), progress=False)
    A = torch.cat([adapter.lora_factors(n)[1] for n in adapter.layers])
    assert A.dtype == torch.float32
    assert not torch.equal(A, A.bfloat16().float())  # fp32 values, not bf16-rounded ones
    if method == "lora_init":
        for name in adapter.layers:
            assert torch.equal(adapter.lora_factors(name)[1], adapter.init_offset(name).A0)


