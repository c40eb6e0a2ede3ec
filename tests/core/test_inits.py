"""Data-driven inits against brute-force references: the statistics engine, EVA, LoRA-DA, LoRA-Init."""

import pytest
import torch
from torch import nn

import shared
from shared.inits.lora_da import lora_da_factors
from shared.statistics import FisherGradient, collect
from tests.helpers import LLAMA_TARGETS, lm_batches, mse, tiny_llama


class TwoLayer(nn.Module):
    """x -> fc1 -> tanh -> fc2, MSE loss to a target; batches are (x, y) tuples."""

    def __init__(self, d_in=10, d_hid=8, d_out=6):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(d_in, d_hid), nn.Linear(d_hid, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _data(n=6, b=4, t=5, d_in=10, d_out=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) * torch.logspace(0, -2, d_in).unsqueeze(1)
    return [(torch.randn(b, t, d_in, generator=g) @ mix, torch.randn(b, t, d_out, generator=g)) for _ in range(n)]


def test_statistics_engine_matches_autograd():
    """G from input/output-gradient hooks equals autograd's ∂L/∂W; Z and y equal their dense definitions."""
    model, data = TwoLayer(), _data()
    layers = {"fc1": model.fc1, "fc2": model.fc2}
    accs = {n: FisherGradient() for n in layers}
    collect(model, layers, accs, data, mse, progress=False)
    for name, layer in layers.items():
        grads, xs, gs = [], [], []
        for x, y in data:
            model.zero_grad()
            inp = {}

            def keep(module, args, out, inp=inp):
                out.retain_grad()
                inp.update(x=args[0], o=out)

            h1 = layer.register_forward_hook(keep)
            mse(model, (x, y)).backward()
            h1.remove()
            grads.append(layer.weight.grad.clone())
            xs.append(inp["x"].reshape(-1, inp["x"].shape[-1]))
            gs.append(inp["o"].grad.reshape(-1, inp["o"].shape[-1]) * x.shape[0])
        X, Gout = torch.cat(xs), torch.cat(gs)
        torch.testing.assert_close(accs[name].grad, torch.stack(grads).mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(accs[name].z.value, X.T @ X / X.shape[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(accs[name].y, Gout.pow(2).mean(0), rtol=1e-4, atol=1e-8)


def test_statistics_engine_restores_model_state():
    model, data = TwoLayer(), _data()
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    collect(model, {"fc1": model.fc1}, {"fc1": FisherGradient()}, data, mse, progress=False)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_lora_da_closed_form_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    d_in, d_out, r = 7, 5, 2
    G = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(40, d_in, generator=g, dtype=torch.float64)
    Z = X.T @ X / 40
    y = torch.rand(d_out, generator=g, dtype=torch.float64) + 0.1
    alpha, beta, gamma, N, lam = 1.0, 0.5, 16.0, 100, 1e-6
    A, B = lora_da_factors(G, Z, y, r=r, alpha=alpha, beta=beta, gamma=gamma, population=N, damping=lam)
    # dense reference with explicit inverses
    Zi = torch.linalg.inv(Z + lam * torch.eye(d_in, dtype=Z.dtype))
    Yi = torch.diag(1 / (y + lam))
    D = -Zi @ G.T @ Yi
    s = torch.linalg.svdvals(D)[0]
    Dh = D / s
    omega = -alpha * Dh @ Dh.T + beta * (torch.trace(Yi) / (N * s**2)) * Zi
    A0 = A.T * gamma**0.5
    # A0 is orthonormal and minimises tr(A0ᵀ Ω A0) (Ky Fan): equal to the sum of the r smallest eigenvalues
    torch.testing.assert_close(A0.T @ A0, torch.eye(r, dtype=A0.dtype), rtol=0, atol=1e-10)
    ev = torch.linalg.eigvalsh(omega)
    torch.testing.assert_close(torch.trace(A0.T @ omega @ A0), ev[:r].sum(), rtol=1e-8, atol=1e-10)
    for seed in range(20):  # and no random orthonormal A does better
        Qr, _ = torch.linalg.qr(torch.randn(d_in, r, generator=torch.Generator().manual_seed(seed), dtype=A0.dtype))
        assert torch.trace(Qr.T @ omega @ Qr) >= ev[:r].sum() - 1e-12
    torch.testing.assert_close(B * gamma**0.5, (A0.T @ Dh).T, rtol=1e-8, atol=1e-10)


def test_eva_rows_span_top_principal_directions():
    """With ρ = 1 (no redistribution) A's rows span the top-r right singular vectors of the centred inputs."""
    model, data = TwoLayer(), _data(n=4, b=8, t=10)
    cfg = shared.AdapterConfig(method="eva", r=3, alpha=3, target_modules=["fc1"], eva_rho=1.0, eva_tau=1.0,
                               eva_max_batches=4)
    with pytest.warns(UserWarning, match="cap"):
        adapter = shared.attach(model, cfg, data=data, forward_fn=mse, progress=False)
    A = adapter.lora_factors("fc1")[1].detach().double()
    X = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in data]).double()
    _, _, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    ref = Vh[:3]
    torch.testing.assert_close(A @ A.T, torch.eye(3, dtype=A.dtype), rtol=0, atol=1e-5)  # orthonormal rows
    torch.testing.assert_close(A.T @ A, ref.T @ ref, rtol=0, atol=2e-3)  # same subspace
    assert torch.count_nonzero(adapter.lora_factors("fc1")[0]) == 0  # B = 0


def test_eva_redistributes_within_budget_and_reloads():
    model, batches = tiny_llama(), lm_batches(n=8)
    cfg = shared.AdapterConfig(method="eva", r=4, alpha=8, target_modules=LLAMA_TARGETS, eva_rho=2.0, eva_max_batches=8)
    adapter = shared.attach(model, cfg, data=batches)
    ranks = {n: adapter.lora_factors(n)[1].shape[0] for n in adapter.layers}
    n_targets = 7 * 2
    assert sum(ranks.values()) <= 4 * n_targets and max(ranks.values()) <= 8
    assert len(set(ranks.values())) > 1  # ranks really moved
    for name in adapter.layers:  # scale α/r kept when the rank changes
        assert abs(adapter.scale(name) - 2.0) < 1e-9
    # q/k/v share one input, so they share components
    q = adapter.lora_factors("model.layers.0.self_attn.q_proj")[1]
    k = adapter.lora_factors("model.layers.0.self_attn.k_proj")[1]
    m = min(q.shape[0], k.shape[0])
    torch.testing.assert_close(q[:m], k[:m])


def test_lora_init_starts_at_base_and_uses_top_change_rate_directions():
    model, batches = tiny_llama(), lm_batches()
    base = model(**batches[0]).logits
    W0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("q_proj")}
    cfg = shared.AdapterConfig(method="lora_init", r=3, alpha=6, target_modules=LLAMA_TARGETS,
                               lora_init_estimator="gradient", lora_init_steps=2)
    adapter = shared.attach(model, cfg, data=batches)
    torch.testing.assert_close(model(**batches[0]).logits, base, rtol=1e-5, atol=1e-5)
    # brute force: the gradient estimator's top-3 change-rate directions of W, from autograd
    name = "model.layers.1.self_attn.q_proj"
    ref = tiny_llama()
    ref.train(False)
    for p in ref.parameters():
        p.requires_grad_(False)
    w = ref.get_submodule(name).weight
    w.requires_grad_(True)
    for b in batches[:2]:
        ref(**b).loss.backward()
    dW = -(w.grad / 2).double()
    U, S, Vh = torch.linalg.svd(W0[name].double(), full_matrices=False)
    rate = torch.diagonal(U.T @ dW @ Vh.T).abs() / S
    idx = torch.argsort(rate, descending=True)[:3]
    expected = (U[:, idx] * S[idx]) @ Vh[idx]
    B, A = adapter.lora_factors(name)
    torch.testing.assert_close((adapter.scale(name) * B @ A).double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(adapter.original_weight(name).double(), W0[name].double(), rtol=1e-5, atol=1e-6)


class _FreshInputs(torch.nn.Module):
    """q/k/v read one tensor; a and b read two different temporaries of the same shape, the first freed before
    the second exists (so the allocator may hand its memory to the second)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.a, self.b = (torch.nn.Linear(256, 8) for _ in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(x) + self.k(x) + self.v(x)
        h = h + self.a(x * 2.0)
        return h + self.b(x * 3.0)


def test_shared_input_groups_never_merge_different_inputs():
    from shared.statistics import shared_input_groups

    torch.manual_seed(0)
    model = _FreshInputs()
    layers = {n: getattr(model, n) for n in "qkvab"}
    for _ in range(20):  # the address reuse is up to the allocator: try many times
        groups = shared_input_groups(model, layers, torch.randn(64, 256), lambda m, b: m(b))
        assert sorted(groups) == [["a"], ["b"], ["q", "k", "v"]]


def test_lora_da_survives_a_rank_deficient_input_moment():
    """A pooler sees one row per sequence: with fewer samples than inputs Z is singular, and in fp32 Z + 1e-6 I is
    not positive definite; the init must damp more (with a warning naming the layer), not crash."""
    g = torch.Generator().manual_seed(0)
    X = 100 * torch.randn(6, 64, generator=g)  # 6 samples, 64 inputs
    Z = X.T @ X / 6
    with pytest.raises(RuntimeError):
        torch.linalg.cholesky((Z + Z.T) / 2 + 1e-6 * torch.eye(64))
    G, y = torch.randn(16, 64, generator=g), torch.rand(16, generator=g)
    with pytest.warns(UserWarning, match=r"LoRA-DA \(pooler\)"):
        A, B = lora_da_factors(G, Z, y, r=4, alpha=1.0, beta=0.03, gamma=1024.0, population=6, damping=1e-6,
                               where=" (pooler)")
    assert A.shape == (4, 64) and B.shape == (16, 4)
    assert torch.isfinite(A).all() and torch.isfinite(B).all() and B.abs().sum() > 0


def test_lora_ga_gradient_equals_peft_preprocess_loraga():
    """LoRA-GA's gradient comes from the statistics engine: the mean over batches of ∂L/∂W that peft's
    ``preprocess_loraga`` reads from ``weight.grad`` (peft's ``lora_ga_init`` then makes the factors from it)."""
    from peft import LoraConfig, LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    from shared.statistics import weight_gradients

    batches = lm_batches(n=3)
    reference = tiny_llama()
    lcfg = LoraConfig(r=2, target_modules=LLAMA_TARGETS, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    preprocess_loraga(reference, lcfg, lambda: [reference(**b).loss.backward() for b in batches])
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LLAMA_TARGETS]
    ours = weight_gradients(model, {n: model.get_submodule(n) for n in names}, batches, max_batches=3, progress=False)
    assert len(names) == 2 * 7
    for name in names:
        torch.testing.assert_close(ours[name], reference.get_submodule(name)._peft_loraga_grad, rtol=1e-4, atol=1e-7,
                                   msg=name)
