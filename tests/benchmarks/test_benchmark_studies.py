"""The cells of ``benchmarks.run`` (TSD analysis, teacher study, subject study, text quality): their metrics on known
answers, and tiny real runs of each cell's ``run_cell``."""

import math
import statistics
from pathlib import Path

import pytest
import torch

import shared
from benchmarks import subject_study, teacher_study, text_quality, tsd_analysis
from shared import tsd
from tests.helpers import LLAMA_TARGETS, lm_batches, tiny_llama, train


def _weight_svd(n: int = 48, m: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, m, generator=g)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return W, U, S, Vh


def test_teacher_change_is_its_own_task_specific_direction_set():
    W, U, S, Vh = _weight_svd()
    k = S.numel()
    idx, dW = teacher_study.teacher_change(U, S, Vh, 6, 0.8, torch.Generator().manual_seed(3))
    assert idx.numel() == 6 and idx.min() >= k // 4 and idx.max() < 3 * k // 4
    rate = tsd.change_rate(S, tsd.delta_sigma(U, Vh, dW, torch.eye(W.shape[1])))
    # δ = 0.8 on I*, 0 elsewhere (dense reference: diag(Uᵀ ΔW V))
    dense = (U.T @ dW @ Vh.T).diagonal().abs() / S
    torch.testing.assert_close(rate, dense, atol=1e-5, rtol=1e-5)
    expected = torch.zeros(k)
    expected[idx] = 0.8
    torch.testing.assert_close(rate, expected, atol=1e-5, rtol=1e-5)
    assert set(tsd.select_directions(rate, 6).tolist()) == set(idx.tolist())


def test_recovery_scores_known_updates():
    W, U, S, Vh = _weight_svd()
    idx, dW = teacher_study.teacher_change(U, S, Vh, 6, 0.5, torch.Generator().manual_seed(1))
    ds_true = tsd.delta_sigma(U, Vh, dW, torch.eye(W.shape[1]))[idx]
    # the teacher's own update, factored B A: everything recovered
    exact = teacher_study.recovery(U, S, Vh, idx, ds_true, Vh[idx], U[:, idx] * ds_true, 6)
    assert exact["teacher_recall_final"] == exact["teacher_recall_final_abs"] == 1.0
    assert exact["recovered_change"] == pytest.approx(1.0, abs=1e-5)
    assert exact["energy_on_teacher"] == pytest.approx(1.0, abs=1e-5)
    # half the change on the same directions
    half = teacher_study.recovery(U, S, Vh, idx, ds_true, Vh[idx], 0.5 * U[:, idx] * ds_true, 6)
    assert half["recovered_change"] == pytest.approx(0.5, abs=1e-5) and half["teacher_recall_final"] == 1.0
    # an update on other directions only: no recall, no recovered change, no energy on I*
    others = torch.tensor([i for i in range(S.numel()) if i not in set(idx.tolist())][:6])
    off = teacher_study.recovery(U, S, Vh, idx, ds_true, Vh[others], U[:, others] * S[others], 6)
    assert off["teacher_recall_final"] == off["teacher_recall_final_abs"] == 0.0
    assert off["recovered_change"] == pytest.approx(0.0, abs=1e-5)
    assert off["energy_on_teacher"] == pytest.approx(0.0, abs=1e-6)


def test_tsd_analysis_helpers():
    assert tsd_analysis.relative_positions(torch.tensor([0, 5, 10]), 11) == [0.0, 0.5, 1.0]
    assert tsd_analysis.overlap(torch.tensor([1, 2, 3, 4]), torch.tensor([4, 3, 9, 8])) == 0.5
    assert tsd_analysis.layer_type("bert.encoder.layer.3.attention.self.query") == "attention.self.query"
    assert tsd_analysis.layer_type("bert.encoder.layer.3.output.dense") == "output.dense"
    assert tsd_analysis.layer_type("model.layers.11.mlp.up_proj") == "mlp.up_proj"
    assert tsd_analysis.layer_type("bert.pooler.dense") == "bert.pooler.dense"
    assert (teacher_study.layer_type("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0")
            == "attn2.to_out.0")


@pytest.mark.slow
def test_tsd_analysis_cell_on_real_minilm(tmp_path: Path):
    pytest.importorskip("transformers")
    cfg = tsd_analysis.cells(["minilm"], [0], rank=4, directions=4, lora_lr=1e-3, full_lr=5e-5, checkpoints=[1, 2, 3],
                             reference_steps=3, eval_examples=32)[0]
    r = tsd_analysis.run_cell(cfg, tmp_path / "work")
    by_t = {row["t"]: row for row in r["by_t"]}
    # each reference against itself: full overlap and rank correlation
    assert by_t[2]["overlap_final"] == 1.0 and by_t[3]["overlap_longer"] == 1.0
    assert by_t[2]["spearman_final"] == pytest.approx(1.0)
    for row in r["by_t"]:
        for key in ("overlap_final", "overlap_longer", "overlap_full"):
            assert 0.0 <= row[key] <= 1.0
        assert -1.0 <= row["spearman_full"] <= 1.0 and not math.isnan(row["spearman_full"])
    for key in ("full", "lora_final", "full_by_abs_change"):
        props = r[key]
        assert sum(props["position_histogram"]) == r["layers"] * cfg["directions"]
        assert props["flat_top_s_mass"] < props["top_s_mass"] <= 1.0  # the top s carry more than a flat share
        assert 0.0 <= props["median_relative_position"] <= 1.0
    assert r["random_overlap"] == pytest.approx(4 / 384)
    text = tsd_analysis.report([{"config": cfg, "result": r}], tmp_path)
    assert "| 3 |" in text and (tmp_path / "tsd_minilm.png").is_file()
    assert "| control: full fine-tune, top s by \\|Δσ\\| (no ÷ σ) |" in text


@pytest.mark.slow
def test_teacher_study_cell_learns_toward_the_teacher(tmp_path: Path):
    records = []
    for method in ("lora", "dash"):
        cfg = teacher_study.cells([method], [0], rank=4, directions=8, teacher_directions=8, teacher_rate=2.0,
                                  teacher_band="moderate", dash_warmup_steps=3, steps=6, batch_size=8, lr=1e-3,
                                  eval_every=3, train_images=64)[0]
        r = teacher_study.run_cell(cfg, tmp_path / method)
        assert r["base_error"] > 0
        assert r["relative_error"] < 1.0  # closer to the teacher than the untrained base
        assert [s for s, _ in r["error_curve"]] == [3, 6]
        for key in ("teacher_recall_final", "teacher_recall_final_abs", "energy_on_teacher"):
            assert 0.0 <= r[key] <= 1.0
        assert (r["teacher_recall_at_switch"] is None) == (method == "lora") == (r["dash_share"] is None)
        if method == "dash":
            assert 0.0 < r["dash_share"] < 1.0  # λ moved off 0 after the switch, LoRA kept training too
        assert set(r["by_layer_type"]) == {f"attn{a}.{t}" for a in (1, 2) for t in ("to_q", "to_k", "to_v", "to_out.0")}
        records.append({"config": cfg, "result": r})
    text = teacher_study.report(records, tmp_path)
    assert "| moderate, δ* = 2 | dash | 1 |" in text and (tmp_path / "teacher_error.png").is_file()


@pytest.mark.slow
def test_subject_cell_trains_and_scores_the_toy_car(tmp_path: Path):
    cfg, = [c for c in subject_study.cells(["car"], ["dash"], [0], steps=3, batch_size=2, rank=2, dash_warmup_steps=1,
                                           num_images=1) if c["method"] == "dash"]
    r = subject_study.run_cell(cfg, tmp_path)
    assert r["lora_file_bytes"] > 0 and r["trainable_parameters"] > 0 and len(r["loss_curve"]) == 3
    assert [m["prompt"] for m in r["metrics"]] == subject_study.prompts("car")
    assert all(0.0 <= m["class_accuracy"] <= 1.0 for m in r["metrics"])


@pytest.mark.parametrize("model", sorted(text_quality.TASKS))
def test_text_tasks_name_assets_the_fetcher_knows(model: str):
    from tsd_common.assets import ASSETS

    spec = text_quality.TASKS[model]
    assert spec["asset"] in ASSETS and spec["data"][0] in ASSETS


@pytest.mark.slow
@pytest.mark.real_assets
@pytest.mark.parametrize("model", sorted(text_quality.TASKS))
def test_text_cell_trains_the_real_model_on_its_task(tmp_path: Path, model: str):
    from tsd_common.assets import AssetMissingError, require_asset

    try:
        for asset in (text_quality.TASKS[model]["asset"], text_quality.TASKS[model]["data"][0]):
            require_asset(asset)
    except AssetMissingError as e:  # names the asset and why it is missing
        pytest.skip(str(e))
    cfg = text_quality.cells(model, ["lora"], ranks=[2], seeds=[0], lrs=[1e-3], steps=3, eval_examples=16)[0]
    r = text_quality.run_cell(cfg, tmp_path)
    assert r["after"]["num_examples"] == 16 and len(r["loss_curve"]) == 3
    assert 0 < r["trainable_parameters"] <= r["stored_parameters"] < r["adapter_file_bytes"] / 4  # fp32 + header


def test_dash_scale_measures_the_trained_dash_term_against_dense_references():
    adapter = shared.attach(tiny_llama(), shared.AdapterConfig(method="dash", r=4, alpha=8,
                                                               target_modules=LLAMA_TARGETS,
                                                               dash_warmup_steps=2, dash_directions=3))
    train(adapter, lm_batches(), steps=5)
    assert adapter.switched
    norms, by_sigma, by_dsigma = [], [], []
    for name, _layer in adapter.dash_layers.items():
        dash = adapter.dash_term(name)
        assert torch.count_nonzero(dash.lam) > 0, name  # λ trained after the switch
        term = (dash.U * dash.lam).detach() @ dash.Vh
        lora = (adapter.delta_weight(name) - term).double()  # dense γBA
        norms.append(float(term.norm() / lora.norm()))
        S = torch.linalg.svdvals(adapter.original_weight(name).double())
        by_sigma += (dash.lam.detach().abs().double() / S[dash.indices]).tolist()
        by_dsigma += [abs(float(dash.lam.detach()[j])) / abs(float(dash.U[:, j].double() @ lora @ dash.Vh[j].double()))
                      for j in range(dash.lam.numel())]
    got = text_quality.dash_scale(adapter)
    assert got["lam_over_lora_norm"] == pytest.approx(statistics.median(norms), rel=1e-4)
    assert got["lam_over_sigma"] == pytest.approx(statistics.median(by_sigma), rel=1e-4)
    assert got["lam_over_lora_dsigma"] == pytest.approx(statistics.median(by_dsigma), rel=1e-4)


def test_lambda_norm_ratios_match_dense_norms():
    """‖U diag(λ) Vᵀ‖_F / ‖γ B A‖_F from the factors equals the ratio of the dense matrices' norms."""
    model = tiny_llama()
    adapter = shared.attach(model, shared.AdapterConfig(method="dash", r=4, alpha=8, target_modules=["q_proj"],
                                                        dash_warmup_steps=1, dash_directions=3))
    train(adapter, lm_batches(2), steps=2, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in adapter.dash_layers:
            adapter.dash_term(name).lam.copy_(torch.randn(3, generator=g))
    got = subject_study.lambda_norm_ratios(adapter)
    assert set(got) == set(adapter.dash_layers)
    for name, ratio in got.items():
        term = adapter.dash_term(name)
        B, A = adapter.lora_factors(name)
        dash = torch.linalg.norm(term.U.double() @ torch.diag(term.lam.double()) @ term.Vh.double())
        lora = torch.linalg.norm(adapter.scale(name) * B.double() @ A.double())
        assert ratio == pytest.approx(float(dash / lora), rel=1e-9)


def test_lambda_study_cells_and_their_rows():
    from benchmarks import run

    full = run.suite_cells("full")
    study = [c for c in full if c["kind"] == "subject" and "dash_lr_ratio" in c]
    assert len(study) == 27 and {c["dash_lr_ratio"] for c in study} == {1.0, 10.0, 100.0}
    assert {(c["subject"], c["seed"], c["method"]) for c in study} == {(s, seed, "dash") for s in subject_study.SUBJECTS
                                                                      for seed in (0, 1, 2)}
    plain = [c for c in full if c["kind"] == "subject" and c["method"] == "dash" and "dash_lr_ratio" not in c]
    assert len(plain) == 9  # the plain dash cells keep their configs (and ids)

    def rec(cfg, probe, norm):
        metrics = [{"subject_probe": probe, "subject_retrieval": 0.0, "class_accuracy": 0.5, "diversity": 0.1},
                   {"subject_probe": 0.1, "class_accuracy": 0.9}, {"class_accuracy": 0.8}]
        return {"config": cfg, "result": {"metrics": metrics, **({"lambda_norm_ratio": norm} if norm else {})}}

    base = {"subject": "car", "seed": 0}
    rows, table = subject_study.summarize([rec({**base, "method": "lora"}, 0.2, None),
                                           rec({**base, "method": "dash"}, 0.3, None),
                                           rec({**base, "method": "dash", "dash_lr_ratio": 10.0}, 0.5, 0.25)])
    ten = next(r for r in rows if r["subject"] == "car" and r["method"] == "dash λlr×10")
    assert ten["‖λ‖/‖γBA‖"] == "0.250" and ten["sks probe − lora's (paired)"] == "0.300"
    assert next(r for r in rows if r["subject"] == "car" and r["method"] == "dash")["‖λ‖/‖γBA‖"] == "–"


@pytest.mark.slow
def test_lambda_study_cell_passes_the_ratio_and_records_the_norms(tmp_path: Path):
    import json

    cfg, = subject_study.lambda_study_cells(["car"], [10.0], [0], steps=3, batch_size=2, rank=2, dash_warmup_steps=1,
                                            num_images=1)
    r = subject_study.run_cell(cfg, tmp_path)
    assert json.loads((tmp_path / "run" / "training_args.json").read_text())["dash_lr_ratio"] == 10.0
    assert r["lambda_norm_ratio"] > 0 and r["lambda_norm_ratio_median"] > 0
