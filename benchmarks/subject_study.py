"""Subject-driven fine-tuning on the shipped mini SDXL: lora vs dash vs the inits, measured with
:class:`tsd_diffusion.evaluation.SubjectEvaluator` (issue 7's study, run by ``python -m benchmarks.run``).

A cell trains ``apps/train_sdxl.py``'s default recipe (text-encoder LoRA, replay prior) on one subject with one
method and seed, then scores ``--num_validation_images`` generations of three prompts with the same seeds:

- ``a photo of sks <class>``: subject fidelity (``subject_probe``, ``subject_retrieval``) and class accuracy;
- ``a photo of a <class>``: the class prompt must stay the class, not become the subject (leakage = its probe);
- ``a photo of a <other>``: another class must stay intact (drift).

A ``base`` cell scores the untrained pipeline on the same prompts and seeds (the "before" row). The replay prior and
the probe's negatives are the base's own generations of the ten classes, shipped with it.

The λ study (:func:`lambda_study_cells`) trains dash with λ's learning rate at ``dash_lr_ratio`` times the base
rate (``--dash_lr_ratio``) and records, per dash layer of the UNet, ‖U diag(λ) Vᵀ‖_F / ‖γ B A‖_F
(:func:`lambda_norm_ratios`): how large the dash term grew against the LoRA term. Its rows are labelled
``dash λlr×<ratio>``.

Subjects: ``car``, the toy car the project draws (``tsd_diffusion.tiny.make_subject_images(subject="car")``), and
the real DreamBooth photos ``cat`` and ``dog`` (the DreamBooth data set, CC BY 4.0) from the folder
``$TSD_DREAMBOOTH_DATA`` names (read in place and downscaled by the trainer; absent data -> the cell is skipped with
the reason).
"""

from __future__ import annotations

import csv
import os
import statistics
from pathlib import Path
from typing import Any

TITLE = "Subject-driven fine-tuning on the mini SDXL"
SUBJECTS = {"car": "automobile", "cat": "cat", "dog": "dog"}  # subject -> its mini SDXL (CIFAR) class
OTHER_CLASS = {"automobile": "dog", "cat": "airplane", "dog": "airplane"}
IDENTIFIER = "sks"
#: what the replay prior and the metrics' gallery are, in every cell's config: the mini SDXL's own generations
#: (``tsd_diffusion.mini_sdxl``). Cells of the CIFAR images used before December 2026 are archived, not mixed in.
DATA = "base-samples-v1"


class SkipCell(RuntimeError):
    """The cell cannot run here (missing data); the runner records the reason."""


def dreambooth_data_dir() -> Path | None:
    """The folder ``$TSD_DREAMBOOTH_DATA`` names (the DreamBooth data set's subject folders), if it exists."""
    env = os.environ.get("TSD_DREAMBOOTH_DATA")
    return Path(env) if env and Path(env).is_dir() else None


def subject_photos(subject: str, work: Path) -> Path:
    """The instance dir of a subject (drawn into ``work`` for ``car``)."""
    from tsd_diffusion.tiny import make_subject_images

    if subject == "car":
        make_subject_images(work / "car_photos", n=5, size=96, seed=0, subject="car")
        return work / "car_photos"
    root = dreambooth_data_dir()
    if root is None or not (root / subject).is_dir():
        raise SkipCell(f"the DreamBooth photos of {subject!r} are not here: set TSD_DREAMBOOTH_DATA to a folder "
                       "holding the DreamBooth data set's subject folders")
    return root / subject


def prompts(subject: str) -> list[str]:
    cls = SUBJECTS[subject]
    return [f"a photo of {IDENTIFIER} {cls}", f"a photo of a {cls}", f"a photo of a {OTHER_CLASS[cls]}"]


def run_cell(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Train one (subject, method, seed) with the default mini SDXL recipe and return its validation metrics."""
    from accelerate.state import AcceleratorState

    from tsd_diffusion.train_sdxl import main, parse_args

    photos = subject_photos(cfg["subject"], work)
    if cfg["method"] == "base":
        return {"metrics": score_base(cfg, photos)}
    AcceleratorState._reset_state(reset_partial_state=True)
    p = prompts(cfg["subject"])
    argv = ["--output_dir", str(work / "run"), "--instance_data_dir", str(photos), "--instance_prompt", p[0],
            "--method", cfg["method"], "--seed", str(cfg["seed"]), "--max_train_steps", str(cfg["steps"]),
            "--train_batch_size", str(cfg["batch_size"]), "--rank", str(cfg["rank"]),
            "--dash_warmup_steps", str(cfg["dash_warmup_steps"]), "--num_validation_images", str(cfg["num_images"]),
            "--checkpointing_steps", "1000000", *[x for q in p for x in ("--validation_prompt", q)]]
    if "dash_lr_ratio" in cfg:
        argv += ["--dash_lr_ratio", str(cfg["dash_lr_ratio"])]
    summary = main(parse_args(argv))
    with open(work / "run" / "loss_log.csv") as f:
        log = list(csv.DictReader(f))
    adapters = summary["adapters"]
    out = {"metrics": summary["validation_metrics"], "final_loss": summary["final_loss"],
           "train_s": float(log[-1]["elapsed"]), "loss_curve": [float(r["loss"]) for r in log],
           "trainable_parameters": sum(p.numel() for a in adapters.values() for p in a.trainable_parameters()),
           "lora_file_bytes": (work / "run" / "pytorch_lora_weights.safetensors").stat().st_size}
    if adapters["unet"].dash_layers:
        ratios = lambda_norm_ratios(adapters["unet"])
        out.update(lambda_norm_ratio=statistics.mean(ratios.values()),
                   lambda_norm_ratio_median=statistics.median(ratios.values()))
    return out


def lambda_norm_ratios(adapter: Any) -> dict[str, float]:
    """‖U diag(λ) Vᵀ‖_F / ‖γ B A‖_F of every dash layer of ``adapter`` (0 where the LoRA term is 0).

    Both from the factors: ‖P Q‖_F² = Σ_ij (PᵀP)_ij (Q Qᵀ)_ij, with (P, Q) = (U diag λ, Vᵀ) and (γB, A).
    """
    import torch

    def frobenius(P: torch.Tensor, Q: torch.Tensor) -> float:
        return float(((P.T @ P) * (Q @ Q.T)).sum().clamp(min=0).sqrt())

    out = {}
    for name in adapter.dash_layers:
        term = adapter.dash_term(name)
        B, A = (t.detach().double() for t in adapter.lora_factors(name))
        lora = frobenius(adapter.scale(name) * B, A)
        dash = frobenius(term.U.detach().double() * term.lam.detach().double(), term.Vh.detach().double())
        out[name] = dash / lora if lora > 0 else 0.0
    return out


def score_base(cfg: dict[str, Any], photos: Path) -> list[dict[str, Any]]:
    """The untrained pipeline on the cell's prompts, with the trainer's validation settings and seeds."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from tsd_diffusion.data import list_instance_images
    from tsd_diffusion.evaluation import SubjectEvaluator
    from tsd_diffusion.mini_sdxl import MINI_NAME, RESOLUTION
    from tsd_diffusion.tiny import resolve_pretrained
    from tsd_diffusion.validation import VALIDATION_INFERENCE_STEPS, generate

    base = resolve_pretrained(MINI_NAME)
    evaluator = SubjectEvaluator.for_base(base, list_instance_images(photos), RESOLUTION)
    pipe = StableDiffusionXLPipeline.from_pretrained(base, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return [evaluator.score(p, generate(pipe, p, cfg["num_images"], cfg["seed"], VALIDATION_INFERENCE_STEPS,
                                        RESOLUTION))
            for p in prompts(cfg["subject"])]


def cells(subjects: list[str], methods: list[str], seeds: list[int], **settings: Any) -> list[dict[str, Any]]:
    """Every (subject, method, seed) cell, plus the base rows, with the shared settings."""
    # order: the untrained base, lora and dash on every (seed, subject) first, then the inits, so that a partial
    # run (--limit, or stopped) already compares lora with dash across subjects
    first = [m for m in ("base", "lora", "dash") if m == "base" or m in methods]
    rest = [m for m in methods if m not in first]
    return [{"kind": "subject", "data": DATA, "subject": subject, "method": method, "seed": seed, **settings}
            for tier in (first, rest) for seed in seeds for subject in subjects for method in tier]


def lambda_study_cells(subjects: list[str], ratios: list[float], seeds: list[int],
                       **settings: Any) -> list[dict[str, Any]]:
    """The λ study: dash on every (subject, seed) at each ``dash_lr_ratio`` (the ratio is part of the config, so
    these cells are apart from the plain dash cells)."""
    return [{"kind": "subject", "data": DATA, "subject": subject, "method": "dash", "seed": seed,
             "dash_lr_ratio": ratio, **settings} for ratio in ratios for seed in seeds for subject in subjects]


def row_label(config: dict[str, Any]) -> str:
    """A cell's row label: its method, with λ's learning-rate ratio for the λ study's cells."""
    return f"dash λlr×{config['dash_lr_ratio']:g}" if "dash_lr_ratio" in config else config["method"]


def report(records: list[dict[str, Any]], out_dir: Path) -> str:
    return summarize(records)[1]


def summarize(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Mean ± std over seeds per (subject, method) and per method over subjects; rows and a markdown table."""
    from .report import mean_std

    keys = [("subject_probe", 0, "sks: subject probe ↑"), ("subject_retrieval", 0, "sks: retrieval ↑"),
            ("class_accuracy", 0, "sks: class acc"), ("subject_probe", 1, "class prompt: probe (leak) ↓"),
            ("class_accuracy", 1, "class prompt: class acc ↑"), ("class_accuracy", 2, "other class: acc ↑"),
            ("diversity", 0, "sks: diversity")]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    probe_of: dict[tuple[str, str, int], float] = {}  # (subject, method, seed) -> sks subject probe
    for r in results:
        if "result" in r:
            c = r["config"]
            groups.setdefault((c["subject"], row_label(c)), []).append({**r["result"], "seed": c["seed"]})
            probe_of[(c["subject"], row_label(c), c["seed"])] = r["result"]["metrics"][0]["subject_probe"]
    for (subject, method), rs in list(groups.items()):
        groups.setdefault(("all", method), []).extend({**m, "subject": subject} for m in rs)
    rows = []
    for (subject, method), rs in sorted(groups.items(),
                                        key=lambda kv: (kv[0][0] == "all", kv[0][0], kv[0][1] != "base", kv[0][1])):
        row = {"subject": subject, "method": method, "n": len(rs)}
        for key, i, label in keys:
            row[label] = mean_std([m["metrics"][i][key] for m in rs])
        # paired with lora on the same subject and seed: the comparison the study is for
        paired = [m["metrics"][0]["subject_probe"] - probe_of[(m.get("subject", subject), "lora", m["seed"])]
                  for m in rs if (m.get("subject", subject), "lora", m["seed"]) in probe_of]
        row["sks probe − lora's (paired)"] = mean_std(paired) if method not in ("base", "lora") else "–"
        row["‖λ‖/‖γBA‖"] = mean_std([m.get("lambda_norm_ratio") for m in rs])
        row["train s"] = mean_std([m.get("train_s") for m in rs], digits=0)
        rows.append(row)
    header = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return rows, "\n".join(lines)
