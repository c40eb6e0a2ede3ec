"""benchmarks.run: cells are keyed by their config, finished cells are not run again, and the report's numbers are
the cell files' (best lr per method, mean ± std over seeds, steps to reach LoRA's final loss)."""

import json
import statistics

import pytest

from benchmarks import run, subject_study, text_quality


def _text(method, lr, seed, acc, losses):
    return {"config": {"kind": "text", "model": "minilm", "method": method, "rank": 4, "lr": lr, "seed": seed,
                       "steps": len(losses), "eval_examples": 10},
            "result": {"before": {"accuracy": 0.5}, "after": {"accuracy": acc}, "train": {"final_loss": losses[-1]},
                       "loss_curve": losses, "trainable_parameters": 100, "adapter_file_bytes": 2048}}


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


def test_text_report_picks_each_methods_best_lr_and_counts_steps_to_loras_loss(tmp_path):
    lora = [1.0, 0.8, 0.6, 0.5]
    records = [_text("lora", 1e-3, 0, 0.70, lora), _text("lora", 1e-3, 1, 0.80, lora),
               _text("lora", 3e-3, 0, 0.60, lora), _text("lora", 3e-3, 1, 0.60, lora),
               _text("dash", 1e-3, 0, 0.90, [0.4] * 4), _text("dash", 1e-3, 1, 0.70, [0.4] * 4)]
    table = text_quality.report(records, tmp_path)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| lora")
            or line.startswith("| dash")}
    assert "| 0.001 | 2 |" in rows["lora"] and f"{statistics.mean([0.7, 0.8]):.3f} ± {statistics.stdev([0.7, 0.8]):.3f}" in rows["lora"]
    # lora's smoothed final loss is mean(1, .8, .6, .5) = 0.725; lora's own curve reaches it at step 4, dash at 1
    assert rows["lora"].split(" | ")[7] == "4" and rows["dash"].split(" | ")[7] == "1"
    assert (tmp_path / "text_minilm_loss.png").stat().st_size > 0


def test_subject_summary_is_mean_and_std_over_seeds():
    def rec(method, seed, probe):
        metrics = [{"subject_probe": probe, "subject_retrieval": 0.0, "class_accuracy": 0.5, "diversity": 0.1},
                   {"subject_probe": 0.1, "class_accuracy": 0.9}, {"class_accuracy": 0.8}]
        return {"config": {"subject": "car", "method": method, "seed": seed}, "result": {"metrics": metrics}}

    rows, table = subject_study.summarize([rec("lora", 0, 0.2), rec("lora", 1, 0.4), rec("base", 0, 0.0),
                                           {"config": {"subject": "cat", "method": "lora", "seed": 0}, "skipped": "x"}])
    lora = next(r for r in rows if r["subject"] == "car" and r["method"] == "lora")
    assert lora["n"] == 2 and lora["sks: subject probe ↑"] == f"0.300 ± {statistics.stdev([0.2, 0.4]):.3f}"
    assert [r["method"] for r in rows if r["subject"] == "car"] == ["base", "lora"]  # base first
    assert any(r["subject"] == "all" for r in rows) and "| car | lora | 2 |" in table
