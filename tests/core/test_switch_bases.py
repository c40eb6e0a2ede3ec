"""The dash switch's SVDs computed away from the switch step (``shared.bases``): in the background, up front or from
the on-disk cache, the switch selects bit for bit what it selects computing them itself (fp32, CPU), and the cache
is never trusted: other weights, corrupt, partial or changed files are not used."""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import shared
from shared import bases as bases_module
from shared import tsd
from shared.errors import InputError
from tests.helpers import LLAMA_TARGETS, lm_batches, tiny_llama

T, S = 3, 3
KEYS = ("U", "Vh", "indices", "sigma", "delta_sigma", "energy", "lam")


class Wide(nn.Module):
    """Layers large enough that MKL's SVD and matmuls run multi-threaded (the tiny LLaMA's are 16-64 wide)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up, self.down = nn.Linear(192, 320), nn.Linear(320, 192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _config(model: str, method: str = "dash", **kw) -> shared.AdapterConfig:
    targets = ["up", "down"] if model == "wide" else LLAMA_TARGETS
    return shared.AdapterConfig(method=method, r=4, alpha=8, target_modules=targets, dash_warmup_steps=T,
                                dash_directions=S, lora_init_steps=2, **kw)


def _run(model: str = "llama", method: str = "dash", steps: int = T + 2, seed: int = 0, between=None,
         **kw) -> shared.Adapter:
    """Attach and train ``steps`` optimizer steps (the switch at step T); ``between(adapter)`` runs after step T-1."""
    net = Wide(seed) if model == "wide" else tiny_llama(seed=seed)
    if model == "llama":
        batches = lm_batches(n=steps)
    else:
        batches = [torch.randn(8, 192, generator=torch.Generator().manual_seed(i)) for i in range(steps)]
    init_data = lm_batches(n=2, seed=7) if method == "tsd" else None
    adapter = shared.attach(net, _config(model, method, **kw), data=init_data)
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    net.train()
    for step, batch in enumerate(batches, 1):
        loss = net(**batch).loss if model == "llama" else net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        adapter.step(opt)
        if step == T - 1 and between is not None:
            between(adapter)
    return adapter


def _state(adapter: shared.Adapter) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": getattr(adapter.dash_term(name), key).detach().clone()
            for name in adapter.dash_layers for key in KEYS}


def _assert_identical(got: shared.Adapter, want: shared.Adapter) -> None:
    a, b = _state(got), _state(want)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (
            f"{key} differs: max |diff| {(a[key].double() - b[key].double()).abs().max():.3g}")
    assert all(got.dash_term(n).is_active for n in got.dash_layers)


def _wait(adapter: shared.Adapter) -> None:
    """Let the background thread finish before the switch (it runs in the idle scheduling class, and the switch
    computes what it has not finished)."""
    adapter.switch_bases.wait()


def _reference_switch(adapter: shared.Adapter) -> dict[str, tuple]:
    """The switch as the core computed it before the SVDs moved (``tsd.iter_svd`` at the switch): per layer U_I, V_Iᵀ,
    I, σ, Δσ, energy from the adapter's current factors."""
    out = {}
    for name, U, S_, Vh in tsd.iter_svd(list(adapter.dash_layers), adapter.original_weight, adapter.dense_shape):
        P, Q = adapter.update_factors(name)
        ds = tsd.delta_sigma(U, Vh, P, Q)
        idx = tsd.select_directions(tsd.change_rate(S_, ds, adapter.config.dash_eps), S,
                                    tsd.non_null(S_, adapter.dense_shape(name)))
        energy = torch.tensor([tsd.energy_share(U[:, idx], Vh[idx], P, Q),
                               float(ds.pow(2).sum() / ((P.T @ P) * (Q @ Q.T)).sum())])
        out[name] = (U[:, idx], Vh[idx], idx, S_, ds, energy)
    return out


@pytest.fixture
def svd_calls(monkeypatch):
    """Counts the batched SVD calls: ``calls["switch"]`` are those the switch makes itself (in its own thread; a
    background thread it waits for does not count)."""
    calls = {"all": 0, "switch": 0}
    in_switch = set()  # ids of the threads inside Adapter.switch
    real_svd, real_switch = tsd.batched_svd, shared.Adapter.switch

    def counting_svd(stack):
        calls["all"] += 1
        calls["switch"] += threading.get_ident() in in_switch
        return real_svd(stack)

    def switch(self, *a, **kw):
        in_switch.add(threading.get_ident())
        try:
            return real_switch(self, *a, **kw)
        finally:
            in_switch.discard(threading.get_ident())

    monkeypatch.setattr(tsd, "batched_svd", counting_svd)
    monkeypatch.setattr(shared.Adapter, "switch", switch)
    return calls


def test_switch_schedule_equals_the_old_switch():
    """dash_svd="switch" is the old code path: its records equal iter_svd + selection at the switch, bit for bit."""
    adapter = _run(steps=T, dash_svd="switch")  # stop right after the switch, which changes no factor: the
    assert adapter.switched  # reference sees the P, Q the switch saw
    for name, (U_I, Vh_I, idx, sig, ds, energy) in _reference_switch(adapter).items():
        term = adapter.dash_term(name)
        k = idx.numel()
        assert torch.equal(term.indices[:k], idx) and (term.indices[k:] == -1).all()
        assert torch.equal(term.U[:, :k], U_I) and torch.equal(term.Vh[:k], Vh_I)
        assert torch.equal(term.sigma, sig) and torch.equal(term.delta_sigma, ds) and torch.equal(term.energy, energy)


@pytest.mark.parametrize(("model", "method"), [("llama", "dash"), ("llama", "tsd"), ("wide", "dash")])
@pytest.mark.parametrize("schedule", ["background", "upfront"])
def test_precomputed_bases_select_exactly_what_the_switch_selects(schedule, method, model, svd_calls):
    """Directions, indices, σ, Δσ, energies and λ two steps after the switch are bitwise those of dash_svd="switch";
    tsd residualises W, so this also checks that the precomputed SVDs are of the original W."""
    want = _run(model, method, dash_svd="switch")
    assert svd_calls["switch"] > 0
    svd_calls.update(all=0, switch=0)
    got = _run(model, method, dash_svd=schedule, between=_wait)
    assert svd_calls["all"] > 0 and svd_calls["switch"] == 0, svd_calls  # computed ahead, not at the switch
    _assert_identical(got, want)


def test_background_runs_at_idle_priority_in_its_own_thread(monkeypatch):
    """The background SVDs run in another thread, which asks for the idle scheduling class on CPU."""
    threads, policies = [], []
    real = tsd.batched_svd

    def spy(stack):
        threads.append(threading.current_thread().name)
        if hasattr(os, "sched_getscheduler"):
            policies.append(os.sched_getscheduler(0))
        return real(stack)

    monkeypatch.setattr(tsd, "batched_svd", spy)
    adapter = _run(dash_svd="background", steps=T - 1)  # stop before the switch
    adapter.switch_bases.wait()
    assert threads and set(threads) == {"tsd-switch-svd"}
    if hasattr(os, "SCHED_IDLE"):
        assert set(policies) == {os.SCHED_IDLE}


def test_cache_is_reused_by_a_later_run_and_never_for_other_weights(tmp_path, svd_calls):
    want = _run(dash_svd="switch")
    want_other = _run(dash_svd="switch", seed=1)
    svd_calls.update(all=0, switch=0)

    first = _run(dash_svd="upfront", dash_svd_cache_dir=str(tmp_path))
    files = sorted(tmp_path.glob("switch-svd-*.safetensors"))
    assert len(files) == svd_calls["all"] == 4 and svd_calls["switch"] == 0  # 4 shapes in the tiny LLaMA
    _assert_identical(first, want)

    svd_calls.update(all=0)
    again = _run(dash_svd="background", dash_svd_cache_dir=str(tmp_path), between=_wait)
    assert svd_calls["all"] == 0, "a run on the same weights must read every SVD from the cache"
    _assert_identical(again, want)

    other = _run(dash_svd="upfront", dash_svd_cache_dir=str(tmp_path), seed=1)  # other base weights
    assert svd_calls["all"] == 4, "the cache of other weights must not be used"
    assert len(list(tmp_path.glob("switch-svd-*.safetensors"))) == 8
    _assert_identical(other, want_other)

    svd_calls.update(all=0)
    at_switch = _run(dash_svd="switch", dash_svd_cache_dir=str(tmp_path))  # the switch schedule reads the cache too
    assert svd_calls["all"] == 0
    _assert_identical(at_switch, want)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "other_key", "not_safetensors"])
def test_damaged_cache_files_are_rebuilt_never_trusted(damage, tmp_path, svd_calls):
    want = _run(dash_svd="switch")
    _run(dash_svd="upfront", dash_svd_cache_dir=str(tmp_path))
    files = sorted(tmp_path.glob("switch-svd-*.safetensors"))
    victim = files[0]
    if damage == "flipped_byte":
        _flip_last_byte(victim)
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "other_key":  # a valid file of other weights, under this key's name
        victim.write_bytes(files[1].read_bytes())
    else:
        victim.write_bytes(b"not a safetensors file")
    svd_calls.update(all=0, switch=0)
    with pytest.warns(UserWarning, match="corrupt, partial or not of these weights; rebuilding"):
        got = _run(dash_svd="upfront", dash_svd_cache_dir=str(tmp_path))
    assert svd_calls["all"] == 1, "exactly the damaged file's SVDs are recomputed"
    _assert_identical(got, want)
    svd_calls.update(all=0)
    _run(dash_svd="upfront", dash_svd_cache_dir=str(tmp_path))  # the rebuilt file is good again
    assert svd_calls["all"] == 0


@pytest.mark.parametrize("cache", [False, True])
def test_a_file_changed_after_it_was_checked_is_checked_again_at_the_switch(cache, tmp_path, svd_calls):
    want = _run(dash_svd="switch")
    svd_calls.update(all=0, switch=0)

    def damage(adapter):
        adapter.switch_bases.wait()
        time.sleep(0.05)  # past the file system's timestamp granularity, so the change shows in the mtime
        for path in adapter.switch_bases.files:
            _flip_last_byte(path)

    with pytest.warns(UserWarning, match="changed since it was written or checked"):
        got = _run(dash_svd="background", dash_svd_cache_dir=str(tmp_path) if cache else None, between=damage)
    assert svd_calls["switch"] == 4  # every damaged file recomputed at the switch
    _assert_identical(got, want)


def test_weights_changed_after_the_svds_started_are_recomputed_at_the_switch(svd_calls):
    """An in-place change of a base weight between the precompute and the switch is seen (tensor version): the
    switch computes the SVDs of the weights it has then."""

    def scale_base(adapter):
        with torch.no_grad():
            adapter.layers["model.layers.0.self_attn.q_proj"].get_base_layer().weight.mul_(2)

    want = _run(dash_svd="switch", between=scale_base)
    svd_calls.update(all=0, switch=0)
    got = _run(dash_svd="upfront", between=scale_base)
    assert svd_calls["switch"] == 4
    _assert_identical(got, want)


def test_another_thread_count_at_the_switch_recomputes(svd_calls):
    """MKL's SVD bits depend on the thread count: bases computed under another count are not used."""
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("needs 2 threads to change the count")
    try:
        want = _run(dash_svd="switch", between=lambda a: torch.set_num_threads(1))
        torch.set_num_threads(threads)
        svd_calls.update(all=0, switch=0)
        got = _run(dash_svd="upfront", between=lambda a: torch.set_num_threads(1))
    finally:
        torch.set_num_threads(threads)
    assert svd_calls["all"] == 8 and svd_calls["switch"] == 4  # computed ahead under 2 threads, again under 1
    _assert_identical(got, want)


def test_an_io_error_in_the_background_warns_and_the_switch_computes(monkeypatch, svd_calls):
    want = _run(dash_svd="switch")

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bases_module, "_write", full_disk)
    svd_calls.update(all=0, switch=0)
    with pytest.warns(UserWarning, match="background SVDs stopped"):  # the thread has failed before the switch
        got = _run(dash_svd="background", between=lambda a: a.switch_bases.wait())
    assert svd_calls["switch"] == 4
    _assert_identical(got, want)


def test_the_switch_does_not_wait_for_a_slow_background_thread(monkeypatch, svd_calls):
    """A background thread that has not finished (here: held inside its first SVD) does not hold the switch up: the
    switch computes every SVD itself, selects what it always selects, the thread's files are removed when it ends,
    and until then the exit handler knows the thread (it waits for it: a thread left inside a LAPACK call while the
    interpreter shuts down aborts the process)."""
    want = _run(dash_svd="switch")
    release, counting = threading.Event(), tsd.batched_svd

    def slow_in_background(stack):
        if threading.current_thread().name == "tsd-switch-svd":
            release.wait(60)
        return counting(stack)

    monkeypatch.setattr(tsd, "batched_svd", slow_in_background)
    seen = {}
    svd_calls.update(all=0, switch=0)
    got = _run(dash_svd="background", between=lambda a: seen.update(bases=a.switch_bases))
    assert svd_calls["switch"] == 4
    _assert_identical(got, want)
    bases = seen["bases"]
    assert bases.directory.exists()  # the thread still writes there
    assert bases in bases_module._RUNNING
    release.set()
    bases.wait()
    assert not bases.directory.exists()
    assert bases not in bases_module._RUNNING


def test_temporary_files_are_removed_after_the_switch():
    seen = {}
    adapter = _run(dash_svd="background", between=lambda a: seen.update(dir=a.switch_bases.directory) or _wait(a))
    assert adapter.switched and adapter.switch_bases is None
    assert not seen["dir"].exists()


def test_share_out_balances_and_is_deterministic():
    costs = [10, 1, 7, 7, 3, 2]
    owner = bases_module.share_out(costs, 2)
    assert owner == bases_module.share_out(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(2)]
    assert sorted(loads) == [15, 15]
    assert bases_module.share_out(costs, 1) == [0] * len(costs)


def test_bad_schedule_and_cache_dir_are_refused(tmp_path):
    with pytest.raises(InputError, match="dash_svd must be one of"):
        _config("llama", dash_svd="later")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="dash_svd_cache_dir"):
        shared.attach(tiny_llama(), _config("llama", dash_svd_cache_dir=str(blocker)))
    cfg = _config("llama", dash_svd_cache_dir=tmp_path / "cache")  # a Path is accepted, stored as a string
    assert cfg.dash_svd_cache_dir == str(tmp_path / "cache")


def test_no_threads_or_files_for_methods_without_dash(tmp_path):
    adapter = _run(method="lora", dash_svd_cache_dir=str(tmp_path))
    assert adapter.switch_bases is None and not list(tmp_path.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.prepare_switch()
