"""The benchmark suites: ``python -m benchmarks.run --suite {quick,full} [--only KIND ...]``.

A suite is a list of *cells* (one training run or measurement, a JSON config). Each cell runs in its own
process and writes ``benchmarks/results/<suite>/cells/<kind>-<hash>.json`` (hash of its config); a cell whose
file exists is not run again, so an interrupted ``full`` suite resumes where it stopped and a changed config
becomes a new cell. A cell that needs an asset which is not in the cache and cannot be fetched (a package the
registry no longer serves, no network) is *not runnable here*: it writes ``<kind>-<hash>.unrunnable.json`` with the
reason instead, the suite goes on with the other cells, and the next run tries it again. That is not a failure of
the suite; a cell that raises anything else stops the suite with the cell's name. After the cells, the report is
rebuilt from every cell file of the suite: ``report.md`` (tables, machine, versions, date; the cells not runnable
here with their reasons) and PNG plots beside it. Nothing in the report is typed by hand.

Kinds: ``subject`` (:mod:`benchmarks.subject_study`), ``text`` (:mod:`benchmarks.text_quality`), ``commonsense``
(:mod:`benchmarks.commonsense`), ``tsd`` (:mod:`benchmarks.tsd_analysis`), ``teacher``
(:mod:`benchmarks.teacher_study`) and ``cost`` (:mod:`benchmarks.cost`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / "work"  # training outputs of the cells (gitignored)


def suite_cells(suite: str) -> list[dict[str, Any]]:
    from . import commonsense, cost, subject_study, teacher_study, text_quality, tsd_analysis

    if suite == "quick":  # <= 15 min on 2 CPU cores: one subject, one seed; MiniLM at a short budget
        subject = subject_study.cells(["car"], ["lora", "dash"], [0], steps=100, batch_size=8, rank=4,
                                      dash_warmup_steps=50, num_images=8)
        text = text_quality.cells("minilm", ["lora", "dash"], ranks=[4], seeds=[0, 1], lrs=[1e-3], steps=60,
                                  eval_examples=400)
        tsd = tsd_analysis.cells(["minilm"], [0], rank=4, directions=8, lora_lr=1e-3, full_lr=5e-5,
                                 checkpoints=[10, 25, 50, 100], reference_steps=100, eval_examples=400)
        teacher = teacher_study.cells(["lora", "dash"], [0], **TEACHER, teacher_band="moderate",
                                      teacher_rate=TEACHER_RATES["moderate"], steps=150, dash_warmup_steps=50)
        costs = cost.cells(["llama"], attaches=2, repeats=2, steps=8, memory_steps=0, idle_wait=10.0, idle_budget=30.0)
        mixture = commonsense.cells(methods=["lora"], dash_lr_ratios=[], ranks=[4], seeds=[0], lrs=[5e-4],
                                    **COMMONSENSE_QUICK)
        return costs + subject + text + mixture + tsd + teacher
    if suite == "full":
        subject = subject_study.cells(list(subject_study.SUBJECTS), ["lora", "dash", "lora_init", "tsd", "eva",
                                                                     "lora_da", "pissa", "lora_ga"],
                                      [0, 1, 2], steps=200, batch_size=8, rank=4, dash_warmup_steps=100,
                                      num_images=16)  # the default recipe at half its batch (CPU time)
        subject += subject_study.lambda_study_cells(list(subject_study.SUBJECTS), LAMBDA_LR_RATIOS, [0, 1, 2],
                                                    steps=200, batch_size=8, rank=4, dash_warmup_steps=100,
                                                    num_images=16)
        done = read_cells(suite)  # the text grid's second stage follows from its finished lr sweep
        text = [*text_quality.cells("minilm", text_quality.METHODS, ranks=[4, 16], seeds=[0, 1, 2],
                                    lrs=[3e-4, 1e-3, 3e-3], steps=200, eval_examples=1000, done=done,
                                    extra_ranks={"lora": [32]}),
                *text_quality.cells("smollm2", text_quality.METHODS, ranks=[4, 16], seeds=[0, 1, 2],
                                    lrs=[1e-4, 5e-4, 2e-3], steps=150, eval_examples=400, done=done,
                                    extra_ranks={"lora": [32]})]
        tsd = [*tsd_analysis.cells(["minilm"], [0, 1, 2], rank=4, directions=8, lora_lr=1e-3, full_lr=5e-5,
                                   checkpoints=[10, 25, 50, 100, 200, 400], reference_steps=400, eval_examples=1000),
               *tsd_analysis.cells(["smollm2"], [0, 1, 2], rank=4, directions=8, lora_lr=5e-4, full_lr=1e-5,
                                   checkpoints=[10, 25, 50, 100, 200, 400], reference_steps=400, eval_examples=400)]
        mixture = commonsense.cells(ranks=[4, 16], seeds=[0, 1, 2], lrs=[1e-4, 5e-4, 2e-3], done=done,
                                    extra_ranks={"lora": [32]}, **COMMONSENSE_FULL)
        teacher = [cell for band in ("moderate", "top")  # top σ: the directions the data excites most (a control)
                   for cell in teacher_study.cells(list(text_quality.METHODS), [0, 1, 2], **TEACHER, teacher_band=band,
                                                   teacher_rate=TEACHER_RATES[band], steps=400, dash_warmup_steps=100)]
        return cost.cells(["llama", "minilm"]) + subject + tsd + teacher + text + mixture
    raise ValueError(f"unknown suite {suite!r}")


#: λ's learning rate over the base rate in the λ study's subject cells (``--dash_lr_ratio``)
LAMBDA_LR_RATIOS = [1.0, 10.0, 100.0]
#: the commonsense cells' budget (docs/benchmarks.md#the-commonsense-grid: 105 cells of about 25 min of one core,
#: about a day on two one-thread runners); the quick suite's one cell checks the plumbing
COMMONSENSE_FULL = dict(steps=150, eval_per_task=100)
COMMONSENSE_QUICK = dict(steps=40, eval_per_task=20)
#: the teacher study's task and student: 8 teacher directions per layer, student rank 4 and s = 8
TEACHER = dict(rank=4, directions=8, teacher_directions=8, batch_size=16, lr=1e-3, eval_every=25, train_images=1000)
#: change rates that give both bands about the same base error (held-out MSE to the teacher ~0.006, measured)
TEACHER_RATES = {"moderate": 4.0, "top": 0.5}


def section_intro(module: Any) -> str:
    """What a cell kind measures, for its report section: its module docstring without the title line."""
    return module.__doc__.split("\n\n", 1)[1].strip()


def cell_kinds() -> dict[str, Any]:
    """Cell kind -> its module (``run_cell(cfg, work)``, ``report(records, out_dir)``, ``TITLE``), in report order."""
    from . import commonsense, cost, subject_study, teacher_study, text_quality, tsd_analysis

    return {"subject": subject_study, "text": text_quality, "commonsense": commonsense, "tsd": tsd_analysis,
            "teacher": teacher_study, "cost": cost}


def cell_id(cfg: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg['kind']}-{digest}"


def unrunnable_path(cfg_path: Path) -> Path:
    """Where the cell of ``cfg_path`` says why it is not runnable here (beside its result file)."""
    return cfg_path.with_name(cfg_path.name.replace(".config.json", ".unrunnable.json"))


def run_one(cfg_path: Path) -> None:
    """Child process: run the cell of ``cfg_path`` and write its result (or why it was skipped) beside it; a cell
    that needs a missing asset writes :func:`unrunnable_path` instead; any other error exits non-zero and the
    parent stops with the cell's name."""
    from shared.io import atomic_write_json
    from tsd_common.assets import AssetMissingError, FetchError

    from . import subject_study
    from .report import machine_info

    cfg = json.loads(cfg_path.read_text())
    out = cfg_path.with_name(cfg_path.name.replace(".config.json", ".json"))
    unrunnable_path(cfg_path).unlink(missing_ok=True)  # from an earlier try
    work = WORK / cfg_path.parent.parent.name / out.stem
    runner = cell_kinds()[cfg["kind"]].run_cell
    record: dict[str, Any] = {"config": cfg, "machine": machine_info("peft", "diffusers", "transformers")}
    t = time.perf_counter()
    try:
        record["result"] = runner(cfg, work)
    except subject_study.SkipCell as e:
        record["skipped"] = str(e)
    except (AssetMissingError, FetchError) as e:
        atomic_write_json(unrunnable_path(cfg_path), {"config": cfg, "reason": " ".join(str(e).split())})
        return
    record["wall_s"] = time.perf_counter() - t
    atomic_write_json(out, record)


def run_suite(suite: str, only: list[str] | None, limit: int | None, shard: tuple[int, int] = (0, 1),
              where: dict[str, set[str]] | None = None) -> list[dict[str, Any]]:
    """Run the suite's missing cells in order until none is left (a finished cell may add cells, e.g. the text
    grid's second stage after its lr sweep); ``shard=(k, n)`` runs only the cells whose id hashes to k mod n, so n
    runners (e.g. one CPU thread each) share a suite without running a cell twice; ``where`` keeps the cells whose
    config has, for every key, one of its values (compared as strings)."""
    cells_dir = RESULTS / suite / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    done, tried = 0, set()
    while limit is None or done < limit:
        todo = [c for c in suite_cells(suite) if (not only or c["kind"] in only)
                and all(str(c.get(k)) in v for k, v in (where or {}).items())]
        mine = [(i, c, cell_id(c)) for i, c in enumerate(todo) if int(cell_id(c).rsplit("-", 1)[1], 16) % shard[1]
                == shard[0] and cell_id(c) not in tried and not (cells_dir / f"{cell_id(c)}.json").is_file()]
        if not mine:
            break
        i, cfg, name = mine[0]
        tried.add(name)
        cfg_path = cells_dir / f"{name}.config.json"
        cfg_path.write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
        label = ", ".join(f"{k}={v}" for k, v in cfg.items() if k in ("kind", "subject", "model", "method", "rank",
                                                                       "dash_lr_ratio", "lr", "seed"))
        print(f"[{i + 1}/{len(todo)}] {name}: {label}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--cell", str(cfg_path)], cwd=ROOT.parent)
        if proc.returncode != 0:
            raise SystemExit(f"cell {name} ({label}) failed with exit code {proc.returncode}; its config is {cfg_path}")
        cfg_path.unlink()
        if unrunnable_path(cfg_path).is_file():
            print(f"    not runnable here: {json.loads(unrunnable_path(cfg_path).read_text())['reason']}", flush=True)
            continue
        print(f"    done in {time.perf_counter() - t:.0f} s", flush=True)
        done += 1
    return read_cells(suite)


def read_cells(suite: str) -> list[dict[str, Any]]:
    """Every finished cell file of a suite."""
    return [json.loads(p.read_text()) for p in sorted((RESULTS / suite / "cells").glob("*.json"))
            if not p.name.endswith((".config.json", ".unrunnable.json"))]


def read_unrunnable(suite: str) -> list[dict[str, Any]]:
    """``{"config", "reason"}`` of every cell of a suite whose last try found it not runnable here."""
    return [json.loads(p.read_text()) for p in sorted((RESULTS / suite / "cells").glob("*.unrunnable.json"))]


def standalone_sections() -> list[str]:
    """The standalone measurements' tables (one run each, not cells), from their result files where they exist."""
    from . import switch_cost

    path = RESULTS / "switch_cost.json"
    if not path.exists():
        return []
    result = json.loads(path.read_text())
    return ["", "## The dash switch on a full-size SDXL UNet", "",
            f"`python -m benchmarks.switch_cost`, one run of {result['machine']['date']} "
            f"(`benchmarks/results/switch_cost.json`; how it runs: docs/core.md).", "", switch_cost.markdown(result)]


def values_with_counts(records: list[dict[str, Any]], key: str) -> str:
    """The values of ``key`` over the cells' records, each with its number of cells when they differ."""
    counts = Counter(str(r.get(key, "unknown")) for r in records)
    if len(counts) == 1:
        return next(iter(counts))
    return " / ".join(f"{v} ({n} cell{'s' * (n != 1)})" for v, n in sorted(counts.items()))


def write_report(suite: str, records: list[dict[str, Any]]) -> Path:
    """``report.md`` and the plots of a suite, from its cell files only (the README links the report; it does not
    copy it)."""
    from shared.io import atomic_write_text

    from . import claims, text_quality

    out = RESULTS / suite
    machines = [r["machine"] for r in records if "machine" in r]
    head = [f"Generated by `python -m benchmarks.run --suite {suite}` from {len(records)} cell files in `cells/`."]
    if machines:
        dates = sorted(x["date"] for x in machines)
        packages = sorted({k for m in machines for k in m["versions"]})
        about = {k: values_with_counts(machines, k) for k in ("processor", "cpu_count", "platform", "python")}
        head += [f"Machine: {about['processor']}, {about['cpu_count']} CPUs, {about['platform']}, "
                 f"Python {about['python']}; versions "
                 + ", ".join(f"{k} {values_with_counts([m['versions'] for m in machines], k)}" for k in packages)
                 + f"; cells run {dates[0]} … {dates[-1]}; "
                 f"the cells' wall times add up to {sum(r.get('wall_s', 0.0) for r in records) / 60:.1f} min."]
    have = {cell_id(r["config"]) for r in records}
    planned = suite_cells(suite)
    unrunnable = {cell_id(u["config"]): u for u in read_unrunnable(suite) if cell_id(u["config"]) not in have}
    missing = [c["kind"] for c in planned if cell_id(c) not in have and cell_id(c) not in unrunnable]
    open_sweeps = sum(text_quality.open_sweeps(planned, kind) for kind in ("text", "commonsense"))
    if missing:
        head += ["", f"Cells of the suite not run yet: {len(missing)} ("
                 + ", ".join(f"{k} {missing.count(k)}" for k in cell_kinds() if k in missing) + ")"
                 + (f", plus the other seeds of the {open_sweeps} lr sweep(s) still open (planned at the best lr "
                    "once the sweep is finished)" if open_sweeps else "")
                 + "; the tables below are from the finished cells only."]
    skipped = [r for r in records if "skipped" in r]
    if skipped:
        head += ["", f"Skipped cells: {len(skipped)} (" + "; ".join(sorted({r['skipped'] for r in skipped})) + ")"]
    if unrunnable:
        kinds = [u["config"]["kind"] for u in unrunnable.values()]
        head += ["", f"Cells not runnable here (an asset they need is missing): {len(unrunnable)} ("
                 + ", ".join(f"{k} {kinds.count(k)}" for k in cell_kinds() if k in kinds) + "): "
                 + "; ".join(sorted({u["reason"] for u in unrunnable.values()}))]
    body: list[str] = []
    checked = claims.report(records)
    if checked:
        body += ["", f"## {claims.TITLE}", "", section_intro(claims), "", checked]
    for kind, module in cell_kinds().items():
        mine = [r for r in records if r["config"]["kind"] == kind]
        if mine:
            body += ["", f"## {module.TITLE}", "", section_intro(module), "", module.report(mine, out)]
    if suite == "full":
        body += standalone_sections()
    path = out / "report.md"
    atomic_write_text(path, "\n".join([f"# Benchmark suite `{suite}`", "", *head, *body]) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=["quick", "full"], default="quick")
    ap.add_argument("--only", action="append", choices=["subject", "text", "commonsense", "tsd", "teacher", "cost"],
                    help="run only these cell kinds")
    ap.add_argument("--limit", type=int, default=None, help="run at most N new cells, then write the report")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="run only the cells whose config has this value, e.g. method=dash (repeatable: values of one "
                         "key are alternatives, different keys must all match)")
    ap.add_argument("--shard", default="0/1",
                    help="K/N: run only the cells whose id hashes to K mod N (N parallel runners)")
    ap.add_argument("--report_only", action="store_true", help="rebuild the report from the existing cell files")
    ap.add_argument("--cell", type=Path, help=argparse.SUPPRESS)  # internal: run one cell in this process
    args = ap.parse_args(argv)
    if args.cell is not None:
        try:
            run_one(args.cell)
        except Exception:
            traceback.print_exc()
            raise SystemExit(1) from None
        return
    t = time.perf_counter()
    if args.report_only:
        records = read_cells(args.suite)
    else:
        k, n = (int(x) for x in args.shard.split("/"))
        if not 0 <= k < n:
            raise SystemExit(f"--shard {args.shard}: need 0 <= K < N")
        where: dict[str, set[str]] = {}
        for w in args.where:
            key, value = w.split("=", 1)
            where.setdefault(key, set()).add(value)
        records = run_suite(args.suite, args.only, args.limit, (k, n), where)
    path = write_report(args.suite, records)
    print(path.read_text())
    print(f"wrote {path} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
