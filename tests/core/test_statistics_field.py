"""The statistics engine of the data-driven inits under settings the other fixtures do not use (issue 24):
prompt-masked SFT labels, gradient checkpointing, LoRA-DA's population and memory. Every test runs
``shared.attach``; references are autograd or the same init run another way."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import shared
from tests.helpers import LLAMA_TARGETS, lm_batches, mse, tiny_llama


def _sft_batches(n=4, batch_size=3, seq=12, prompt=6):
    """Causal-LM batches whose first ``prompt`` labels are -100 (prompt-masked SFT), padding on one row."""
    batches = lm_batches(n=n, batch_size=batch_size, seq=seq)
    for b in batches:
        b["labels"][:, :prompt] = -100
    return batches


def _renamed(batches):
    return [{("target" if k == "labels" else k): v for k, v in b.items()} for b in batches]


def _loss_from_target(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["target"]).loss


def _assert_same_adapter(a, b, rtol=1e-5, atol=1e-6):
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        for x, y in zip(a.lora_factors(name), b.lora_factors(name), strict=True):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=name)


# ------------------------------------------------------------------------------ 1. gradient statistics and labels
GRADIENT_INITS = {"lora_da": dict(lora_da_num_samples=12, lora_da_population=100),
                  "lora_init": dict(lora_init_estimator="gradient", lora_init_steps=4),
                  "tsd": dict(lora_init_estimator="gradient", lora_init_steps=4, dash_directions=2)}


@pytest.mark.parametrize("method", sorted(GRADIENT_INITS))
def test_init_depends_on_the_loss_not_on_how_the_batch_spells_it(method):
    """Labels in the batch (default forward) and the same loss from a forward_fn reading another key: same adapter."""
    cfg = shared.AdapterConfig(method=method, r=4, alpha=8, target_modules=LLAMA_TARGETS, **GRADIENT_INITS[method])
    batches = _sft_batches()
    by_labels = shared.attach(tiny_llama(), cfg, data=batches, progress=False)
    by_key = shared.attach(tiny_llama(), cfg, data=_renamed(batches), forward_fn=_loss_from_target, progress=False)
    _assert_same_adapter(by_labels, by_key)


def test_gradient_estimate_is_autograds_gradient_on_prompt_masked_batches():
    """LoRA-Init's gradient estimator on SFT batches: its directions are those of the autograd gradient ∂L/∂W."""
    batches = _sft_batches()
    cfg = shared.AdapterConfig(method="lora_init", r=3, alpha=6, target_modules=LLAMA_TARGETS,
                               lora_init_estimator="gradient", lora_init_steps=2)
    adapter = shared.attach(tiny_llama(), cfg, data=batches, progress=False)
    ref = tiny_llama()
    for p in ref.parameters():
        p.requires_grad_(False)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = ref.get_submodule(name).weight
        w.requires_grad_(True)
        w.grad = None
        for b in batches[:2]:
            ref(**b).loss.backward()
        dW = -(w.grad / 2).double()
        w.requires_grad_(False)
        U, S, Vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
        idx = torch.argsort(torch.diagonal(U.T @ dW @ Vh.T).abs() / S, descending=True)[:3]
        B, A = adapter.lora_factors(name)
        torch.testing.assert_close((adapter.scale(name) * B @ A).double(), (U[:, idx] * S[idx]) @ Vh[idx],
                                   rtol=1e-4, atol=1e-5)


def test_label_mask_is_an_explicit_opt_in_with_the_next_token_shift():
    from shared.statistics import gradient_mask

    batch = _sft_batches(n=1)[0]
    on = gradient_mask(shared.AdapterConfig(grad_label_mask=True))(batch)
    off = gradient_mask(shared.AdapterConfig())(batch)
    assert torch.equal(off, batch["attention_mask"].bool())
    expected = torch.zeros_like(on)
    expected[:, :-1] = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, :-1].bool()
    assert torch.equal(on, expected)


# ------------------------------------------------------------------------------ 2. gradient checkpointing
class _Checkpointed(nn.Module):
    """emb -> 2 checkpointed blocks (fc1, tanh, fc2, residual) -> head; MSE loss. ``mode``: None (no checkpointing),
    "reentrant" or "non_reentrant". Like diffusers' UNet it checkpoints whenever grad is enabled, in eval too."""

    def __init__(self, mode=None):
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.emb = nn.Linear(6, 16)
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(16, 24), "fc2": nn.Linear(24, 16)})
                                    for _ in range(2))
        self.head = nn.Linear(16, 5)

    @staticmethod
    def _block(block, h):
        return h + block["fc2"](torch.tanh(block["fc1"](h)))

    def forward(self, x):
        h = self.emb(x)
        if self.mode == "reentrant" and torch.is_grad_enabled():
            h = h.detach().requires_grad_(True)  # what transformers' enable_input_require_grads does for reentrant
        for block in self.blocks:
            if self.mode is not None and torch.is_grad_enabled():
                h = checkpoint(self._block, block, h, use_reentrant=self.mode == "reentrant")
            else:
                h = self._block(block, h)
        return self.head(h)


def _mse_data(n=4):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(3, 7, 6, generator=g), torch.randn(3, 7, 5, generator=g)) for _ in range(n)]


CHECKPOINT_INITS = {"lora_da": dict(lora_da_num_samples=9, lora_da_population=50),
                    "lora_init": dict(lora_init_estimator="gradient", lora_init_steps=3),
                    "lora_init_warmup": dict(lora_init_steps=3),
                    "tsd": dict(lora_init_estimator="gradient", lora_init_steps=3, dash_directions=2),
                    "eva": dict(eva_max_batches=4, eva_rho=1.0),
                    "lora_ga": dict(lora_ga_batches=2)}


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("key", sorted(CHECKPOINT_INITS))
def test_data_driven_inits_under_gradient_checkpointing(key, mode):
    method = key.removesuffix("_warmup")
    cfg = shared.AdapterConfig(method=method, r=2, alpha=6, target_modules=["fc1", "fc2", "head"],
                               **CHECKPOINT_INITS[key])
    plain = shared.attach(_Checkpointed(), cfg, data=_mse_data(), forward_fn=mse, progress=False)
    checkpointed = shared.attach(_Checkpointed(mode), cfg, data=_mse_data(), forward_fn=mse, progress=False)
    _assert_same_adapter(plain, checkpointed)


# ------------------------------------------------------------------------------ 8. LoRA-DA population
def test_lora_da_population_defaults_with_a_warning_and_changes_the_init():
    batches = lm_batches()
    cfg = dict(method="lora_da", r=4, alpha=8, target_modules=["q_proj"], lora_da_num_samples=8)
    with pytest.warns(UserWarning, match="lora_da_population is not set"):
        default = shared.attach(tiny_llama(), shared.AdapterConfig(**cfg), data=batches, progress=False)
    explicit = shared.attach(tiny_llama(), shared.AdapterConfig(**cfg, lora_da_population=8), data=batches,
                             progress=False)
    _assert_same_adapter(default, explicit, rtol=0, atol=0)
    big = shared.attach(tiny_llama(), shared.AdapterConfig(**cfg, lora_da_population=10_000), data=batches,
                        progress=False)
    name = next(iter(big.layers))
    assert not torch.allclose(big.lora_factors(name)[1], default.lora_factors(name)[1], atol=1e-4)


# ------------------------------------------------------------------------------ LoRA-DA memory
def test_lora_da_shares_one_input_moment_per_input_group(monkeypatch):
    from shared import statistics

    made = []
    init = statistics.InputSecondMoment.__init__

    def counting(self):
        made.append(self)
        init(self)

    monkeypatch.setattr(statistics.InputSecondMoment, "__init__", counting)
    cfg = shared.AdapterConfig(method="lora_da", r=4, alpha=8, target_modules=LLAMA_TARGETS, lora_da_num_samples=8,
                               lora_da_population=8)
    shared.attach(tiny_llama(), cfg, data=lm_batches(), progress=False)
    assert len(made) == 2 * 4  # per block: q/k/v, o, gate/up, down


def test_lora_da_in_layer_chunks_equals_one_pass(monkeypatch):
    """lora_da_max_bytes caps the statistics held at once: the layers are solved chunk by chunk, same result."""
    from shared import statistics

    passes = []
    collect = statistics.collect
    monkeypatch.setattr("shared.inits.lora_da.collect", lambda model, layers, *a, **k: passes.append(sorted(layers))
                        or collect(model, layers, *a, **k))
    cfg = dict(method="lora_da", r=4, alpha=8, target_modules=LLAMA_TARGETS, lora_da_num_samples=8,
               lora_da_population=8)
    whole = shared.attach(tiny_llama(), shared.AdapterConfig(**cfg), data=lm_batches(), progress=False)
    assert len(passes) == 1
    budget = 4 * (64 * 32 + 64 + 64 * 64)  # one down_proj group (in 64, out 32): the largest
    chunked = shared.attach(tiny_llama(), shared.AdapterConfig(**cfg, lora_da_max_bytes=budget), data=lm_batches(),
                            progress=False)
    assert len(passes) > 3 and sorted(n for p in passes[1:] for n in p) == passes[0]
    _assert_same_adapter(whole, chunked, rtol=1e-6, atol=1e-7)
