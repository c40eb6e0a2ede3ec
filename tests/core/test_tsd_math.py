"""Brute-force checks of the TSD math (shared/tsd.py) against dense references."""

import torch

from shared import tsd


def _rand(n, m, seed=0):
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed))


def test_delta_sigma_matches_dense_projection():
    W, P, Q = _rand(12, 9), _rand(12, 3, 1), _rand(3, 9, 2)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    dense = torch.diagonal(U.T @ (P @ Q) @ Vh.T)
    torch.testing.assert_close(tsd.delta_sigma(U, Vh, P, Q), dense, rtol=1e-5, atol=1e-5)


def test_change_rate_and_selection_brute_force():
    W, P, Q = _rand(10, 14, 3), _rand(10, 2, 4), _rand(2, 14, 5)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    rate = tsd.change_rate(S, tsd.delta_sigma(U, Vh, P, Q), eps=0.0)
    brute = [abs(float(U[:, i] @ (P @ Q) @ Vh[i])) / float(S[i]) for i in range(S.numel())]
    torch.testing.assert_close(rate, torch.tensor(brute), rtol=1e-5, atol=1e-6)
    idx = tsd.select_directions(rate, 3)
    assert idx.tolist() == sorted(range(len(brute)), key=lambda i: -brute[i])[:3]


def test_change_rate_is_finite_for_rank_deficient_weight():
    W = _rand(8, 1) @ _rand(1, 6, 1)  # rank 1: five zero singular values
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    rate = tsd.change_rate(S, tsd.delta_sigma(U, Vh, _rand(8, 2, 2), _rand(2, 6, 3)), eps=1e-8)
    assert torch.isfinite(rate).all()


def test_select_directions_rejects_too_many():
    try:
        tsd.select_directions(torch.ones(4), 5)
    except ValueError as err:
        assert "4 singular values" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_iter_svd_batches_by_shape_and_matches_single_svd():
    weights = {"a": _rand(6, 4, 1), "b": _rand(5, 7, 2), "c": _rand(6, 4, 3), "d": _rand(6, 4, 4)}
    seen = {}
    # a tiny byte budget forces several chunks per shape
    for name, U, S, Vh in tsd.iter_svd(list(weights), weights.__getitem__, lambda n: weights[n].shape, max_bytes=200):
        seen[name] = (U, S, Vh)
        torch.testing.assert_close((U * S) @ Vh, weights[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(S, torch.linalg.svdvals(weights[name]), rtol=1e-5, atol=1e-6)
    assert set(seen) == set(weights)


def test_canonical_signs_are_sign_invariant():
    W = _rand(7, 5, 9)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    flip = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0])
    U1, V1 = tsd.canonical_signs(U, Vh)
    U2, V2 = tsd.canonical_signs(U * flip, Vh * flip.unsqueeze(1))
    torch.testing.assert_close(U1, U2)
    torch.testing.assert_close(V1, V2)
    torch.testing.assert_close((U1 * S) @ V1, W, rtol=1e-5, atol=1e-5)


def test_energy_share_matches_dense():
    W, P, Q = _rand(9, 8, 5), _rand(9, 3, 6), _rand(3, 8, 7)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    idx = torch.tensor([1, 4])
    dW = P @ Q
    dense = float((U[:, idx].T @ dW @ Vh[idx].T).pow(2).sum() / dW.pow(2).sum())
    assert abs(tsd.energy_share(U[:, idx], Vh[idx], P, Q) - dense) < 1e-5


def test_null_floor_gives_fp32_and_fp64_the_same_directions():
    """On a rank-6 weight the 14 null directions (σ ~ 1e-7 in fp32, ~1e-15 in fp64) are never selected, so fp32 and
    fp64 pick the same ones; without the floor their δ ~ |Δσ|/σ would win every top-s."""
    W = _rand(24, 6) @ _rand(6, 20, 1)
    P, Q = _rand(24, 3, 2), _rand(3, 20, 3)
    picks = []
    for dtype in (torch.float32, torch.float64):
        U, S, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
        rate = tsd.change_rate(S, tsd.delta_sigma(U, Vh, P.to(dtype), Q.to(dtype)))
        valid = tsd.non_null(S, W.shape)
        assert int(valid.sum()) == 6
        picks.append(tsd.select_directions(rate, 4, valid).tolist())
    assert picks[0] == picks[1] and max(picks[0]) < 6
    assert tsd.select_directions(torch.ones(5), 4, torch.tensor([True, False, True, False, False])).tolist() == [0, 2]
