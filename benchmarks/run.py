"""The benchmark suites: ``python -m benchmarks.run --suite {quick,full} [--only KIND ...]``.

A suite is a list of *cells* (one training run or measurement, a JSON config). Each cell runs in its own
process and writes ``benchmarks/results/<suite>/cells/<kind>-<hash>.json`` (hash of its config); a cell whose
file exists is not run again, so an interrupted ``full`` suite resumes where it stopped and a changed config
becomes a new cell. After the cells, the report is rebuilt from every cell file of the suite:
``report.md`` (tables, machine, versions, date) and PNG plots beside it. Nothing in the report is typed by hand.

Kinds: ``subject`` (:mod:`benchmarks.subject_study`) and ``text`` (:mod:`benchmarks.text_quality`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / "work"  # training outputs of the cells (gitignored)


def suite_cells(suite: str) -> list[dict[str, Any]]:
    from . import subject_study, text_quality

    if suite == "quick":  # <= 15 min on 2 CPU cores: one subject, one seed; MiniLM at a short budget
        subject = subject_study.cells(["car"], ["lora", "dash"], [0], steps=100, batch_size=8, rank=4,
                                      dash_warmup_steps=50, num_images=8)
        text = text_quality.cells("minilm", ["lora", "dash"], ranks=[4], seeds=[0, 1], lrs=[1e-3], steps=60,
                                  eval_examples=400)
        return subject + text
    if suite == "full":
        subject = subject_study.cells(list(subject_study.SUBJECTS), ["lora", "dash", "lora_init", "tsd", "eva",
                                                                     "lora_da", "pissa", "lora_ga"],
                                      [0, 1, 2], steps=200, batch_size=8, rank=4, dash_warmup_steps=100,
                                      num_images=16)  # the default recipe at half its batch (CPU time)
        text = [*text_quality.cells("minilm", text_quality.METHODS, ranks=[4, 16], seeds=[0, 1, 2],
                                    lrs=[3e-4, 1e-3, 3e-3], steps=300, eval_examples=1000),
                *text_quality.cells("smollm2", text_quality.METHODS, ranks=[4, 16], seeds=[0, 1, 2],
                                    lrs=[1e-4, 5e-4, 2e-3], steps=150, eval_examples=400)]
        return subject + text
    raise ValueError(f"unknown suite {suite!r}")


def cell_id(cfg: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    return f"{cfg['kind']}-{digest}"


def run_one(cfg_path: Path) -> None:
    """Child process: run the cell of ``cfg_path`` and write its result (or why it was skipped) beside it; an error
    exits non-zero and the parent stops with the cell's name."""
    from shared.io import atomic_write_json

    from . import subject_study, text_quality
    from .report import machine_info

    cfg = json.loads(cfg_path.read_text())
    out = cfg_path.with_name(cfg_path.name.replace(".config.json", ".json"))
    work = WORK / cfg_path.parent.parent.name / out.stem
    runner = {"subject": subject_study.run_cell, "text": text_quality.run_cell}[cfg["kind"]]
    record: dict[str, Any] = {"config": cfg, "machine": machine_info("peft", "diffusers", "transformers")}
    t = time.perf_counter()
    try:
        record["result"] = runner(cfg, work)
    except subject_study.SkipCell as e:
        record["skipped"] = str(e)
    record["wall_s"] = time.perf_counter() - t
    atomic_write_json(out, record)


def run_suite(suite: str, only: list[str] | None, limit: int | None) -> list[dict[str, Any]]:
    cells_dir = RESULTS / suite / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in suite_cells(suite) if not only or c["kind"] in only]
    done = 0
    for i, cfg in enumerate(todo):
        name = cell_id(cfg)
        if (cells_dir / f"{name}.json").is_file():
            continue
        if limit is not None and done >= limit:
            break
        cfg_path = cells_dir / f"{name}.config.json"
        cfg_path.write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")
        label = ", ".join(f"{k}={v}" for k, v in cfg.items() if k in ("kind", "subject", "model", "method", "rank",
                                                                       "lr", "seed"))
        print(f"[{i + 1}/{len(todo)}] {name}: {label}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--cell", str(cfg_path)], cwd=ROOT.parent)
        if proc.returncode != 0:
            raise SystemExit(f"cell {name} ({label}) failed with exit code {proc.returncode}; its config is {cfg_path}")
        cfg_path.unlink()
        print(f"    done in {time.perf_counter() - t:.0f} s", flush=True)
        done += 1
    return read_cells(suite)


def read_cells(suite: str) -> list[dict[str, Any]]:
    """Every finished cell file of a suite."""
    return [json.loads(p.read_text()) for p in sorted((RESULTS / suite / "cells").glob("*.json"))
            if not p.name.endswith(".config.json")]


def write_report(suite: str, records: list[dict[str, Any]]) -> Path:
    """``report.md`` and the plots of a suite, from its cell files only."""
    from shared.io import atomic_write_text

    from . import subject_study, text_quality

    out = RESULTS / suite
    machines = [r["machine"] for r in records if "machine" in r]
    parts = [f"# Benchmark suite `{suite}`", "",
             f"Generated by `python -m benchmarks.run --suite {suite}` from {len(records)} cell files in `cells/`."]
    if machines:
        m = machines[-1]
        dates = sorted(x["date"] for x in machines)
        parts += [f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['platform']}, Python {m['python']}; "
                  f"versions {', '.join(f'{k} {v}' for k, v in m['versions'].items())}; cells run {dates[0]} … {dates[-1]}."]
    skipped = [r for r in records if "skipped" in r]
    if skipped:
        parts += ["", f"Skipped cells: {len(skipped)} (" + "; ".join(sorted({r['skipped'] for r in skipped})) + ")"]
    subject = [r for r in records if r["config"]["kind"] == "subject"]
    if subject:
        _, table = subject_study.summarize(subject)
        parts += ["", "## Subject-driven fine-tuning on the mini SDXL", "", subject_study.__doc__.split("\n\n")[1], "",
                  table]
    text = [r for r in records if r["config"]["kind"] == "text"]
    if text:
        parts += ["", "## Text quality", "", text_quality.report(text, out)]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", choices=["quick", "full"], default="quick")
    ap.add_argument("--only", action="append", choices=["subject", "text"], help="run only these cell kinds")
    ap.add_argument("--limit", type=int, default=None, help="run at most N new cells, then write the report")
    ap.add_argument("--report_only", action="store_true", help="rebuild the report from the existing cell files")
    ap.add_argument("--cell", type=Path, help=argparse.SUPPRESS)  # internal: run one cell in this process
    args = ap.parse_args(argv)
    if args.cell is not None:
        try:
            run_one(args.cell)
        except Exception:
            traceback.print_exc()
            raise SystemExit(1)
        return
    t = time.perf_counter()
    if args.report_only:
        records = read_cells(args.suite)
    else:
        records = run_suite(args.suite, args.only, args.limit)
    path = write_report(args.suite, records)
    print(path.read_text())
    print(f"wrote {path} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
