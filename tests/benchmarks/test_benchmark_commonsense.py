"""The commonsense cell kind: the grid (every method and λ-lr ratio swept, then each at its best lr over the seeds,
through text_quality's two stages), the per-task report with paired verdicts and the paper's rows labelled as theirs,
and one tiny real cell on SmolLM2 and the eight tasks."""

import statistics
from pathlib import Path

import pytest

from benchmarks import commonsense, run, text_quality

TASKS = list(commonsense.TASK_COLUMNS)
GRID = dict(ranks=[4, 16], seeds=[0, 1, 2], lrs=[1e-4, 5e-4], steps=10, eval_per_task=5, extra_ranks={"lora": [32]})


def _record(method, rank, lr, seed, per_task, ratio=1, before=None):
    cfg = {**commonsense.cells(**{**GRID, "lrs": [lr], "seeds": [seed]}, methods=[method], dash_lr_ratios=[])[0],
           "rank": rank, "dash_lr_ratio": ratio}
    after = {"accuracy": statistics.mean(per_task),
             **{f"accuracy/{t}": a for t, a in zip(TASKS, per_task, strict=True)},
             **{f"num_examples/{t}": 5 for t in TASKS}, "num_examples": 40}
    result = {"before": before, "after": after, "train": {"final_loss": 1.0}, "loss_curve": [1.0],
              "trainable_parameters": 10}
    return {"config": cfg, "result": result}


def test_grid_sweeps_every_row_then_runs_each_at_its_best_lr():
    sweep = commonsense.cells(**GRID)
    rows = {(text_quality.arm(c), c["rank"]) for c in sweep}
    assert rows == {(m, r) for m in commonsense.METHODS for r in (4, 16)} | {("lora", 32)} | {
        (f"dash λ-lr ×{x}", r) for x in (10, 100) for r in (4, 16)}
    assert len(sweep) == 2 * len(rows) and {c["seed"] for c in sweep} == {0}  # 2 lrs at seed 0
    assert all(c["train_examples"] == 80 and c["eval_before"] == (c["method"] == "lora" and c["rank"] == 4)
               for c in sweep)
    ratio10 = [c for c in sweep if c["dash_lr_ratio"] == 10]
    assert {c["method"] for c in ratio10} == {"dash"} and len(ratio10) == 4
    done = [_record("dash", 4, 1e-4, 0, [0.5] * 8, ratio=10), _record("dash", 4, 5e-4, 0, [0.6] * 8, ratio=10),
            _record("dash", 4, 1e-4, 0, [0.7] * 8)]  # ratio 1: its sweep is not finished
    second = [c for c in commonsense.cells(**GRID, done=done) if c not in sweep]
    assert [(c["method"], c["rank"], c["dash_lr_ratio"], c["lr"], c["seed"]) for c in second] == [
        ("dash", 4, 10, 5e-4, 1), ("dash", 4, 10, 5e-4, 2)]
    # another budget is another grid: its cells do not finish this one's sweeps
    other = [{**r, "config": {**r["config"], "steps": 11}} for r in done]
    assert [c for c in commonsense.cells(**GRID, done=other) if c not in sweep] == []
    assert text_quality.open_sweeps(sweep, "commonsense") == len(rows)


def test_report_has_the_per_task_table_paired_verdicts_and_the_papers_rows_as_theirs(tmp_path):
    records = []
    for seed in (0, 1, 2):
        base = {"accuracy": 0.4, **{f"accuracy/{t}": 0.4 for t in TASKS}}
        records += [_record("lora", 4, 5e-4, seed, [0.5 + 0.01 * seed] * 8, before=base),
                    _record("dash", 4, 5e-4, seed, [0.6 + 0.01 * seed] * 8),  # +10 points on every seed
                    _record("dash", 4, 5e-4, seed, [0.5 + 0.01 * (2 - seed)] * 8, ratio=100),
                    _record("lora", 32, 5e-4, seed, [0.55] * 8)]
    table = commonsense.report(records, tmp_path)
    assert ("| method | rank | lr | seeds | BoolQ | PIQA | SIQA | HellaS. | WinoG. | ARC-e | ARC-c | OBQA | Avg |"
            in table)
    assert "| untrained base | – | – | – | " + " | ".join(["40.0"] * 9) + " | – | – |" in table
    lines = {line.split(" | ")[0].strip("| ") + line.split(" | ")[1]: line for line in table.splitlines()
             if line.startswith("| lora |") or line.startswith("| dash")}
    assert lines["lora4"].endswith("| 51.0 ± 1.0 | – | – |")
    assert lines["dash4"].endswith("| 61.0 ± 1.0 | 10.0 ± 0.0 | **holds** |")
    assert lines["dash λ-lr ×1004"].endswith("| 0.0 ± 2.0 | within seed noise |")
    # the paper's numbers for the rows the grid has, and only those, labelled as theirs
    assert "**theirs, not ours**" in table
    assert "| LLaMA-7B | lora | 4 | 2.3 | 46.1 | 18.3 | 19.7 | 55.2 | 65.4 | 51.9 | 57.0 | 39.5 |" in table
    assert "| LLaMA-7B | dash | 4 | 65.2 |" in table and "| LLaMA3-8B | lora | 32 | 70.8 |" in table
    assert "| LLaMA3-8B | dash | 16 |" not in table  # no dash r=16 cell here
    assert "Evaluation items per task: BoolQ 5, PIQA 5" in table


def test_the_kind_is_registered_and_the_full_grid_is_the_issues(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(run, "RESULTS", tmp_path)  # no finished cell: the grid is its sweep, whatever the repo holds
    assert run.cell_kinds()["commonsense"] is commonsense
    full = [c for c in run.suite_cells("full") if c["kind"] == "commonsense"]
    rows = {(text_quality.arm(c), c["rank"]) for c in full}
    assert len(rows) == 8 * 2 + 1 + 2 * 2 and len(full) == 3 * len(rows)
    assert [c for c in run.suite_cells("quick") if c["kind"] == "commonsense"][0]["method"] == "lora"


@pytest.mark.slow
@pytest.mark.real_assets
def test_commonsense_cell_trains_smollm2_on_the_eight_tasks(tmp_path: Path):
    from tsd_common.assets import AssetMissingError, require_asset

    try:
        require_asset("smollm2"), require_asset("commonsense")
    except AssetMissingError as e:
        pytest.skip(str(e))
    cfg = commonsense.cells(methods=["dash"], dash_lr_ratios=[], ranks=[2], seeds=[0], lrs=[1e-3], steps=5,
                            eval_per_task=2)[0]
    r = commonsense.run_cell(cfg, tmp_path)
    assert [r["after"][f"num_examples/{t}"] for t in TASKS] == [2] * 8 and len(r["loss_curve"]) == 5
    assert r["train"]["dash_switch_step"] == 1 and "dash_scale" in r
    assert r["after"]["accuracy"] == pytest.approx(statistics.mean(r["after"][f"accuracy/{t}"] for t in TASKS))
