"""The text trainer: one accelerate loop for causal-LM multiple choice and sequence classification, any method.

    accelerate launch apps/train_text.py --model_name_or_path DIR --task causal-mc \\
        --train_file train.json --eval_file test.json --method dash --rank 8 --lora_alpha 16 \\
        --target_modules q_proj k_proj v_proj up_proj down_proj --dash_warmup_steps 30 --dash_directions 8 \\
        --learning_rate 5e-4 --max_steps 100 --output_dir out/

Order of work (:func:`main`: the config, then :func:`setup` -> :func:`train_loop` -> :func:`finish`): the checks
that need no model run first (arguments, adapter configuration, files, formats, rows, labels), then the tokenizer
(pad token, truncation counts), the model (target modules, task head), the adapter (``shared.attach``, before
``accelerator.prepare``), evaluation before training, the loop, evaluation after it, and the outputs. The
plumbing shared with the SDXL trainer (accelerator, resume, checkpoint hooks, loss log) is ``tsd_common.training``.
``adapter.step(optimizer)`` runs once per optimizer step (when ``accelerator.sync_gradients``),
so the dash switch lands at exactly ``--dash_warmup_steps`` updates whatever the accumulation.

Outputs in ``--output_dir`` (main process, atomic writes):

- ``adapter_model.safetensors``, ``adapter_config.json``: a standard LoRA (``shared.export_lora``) that stock
  ``PeftModel.from_pretrained(base, output_dir)`` loads, the head included for classification;
- ``eval_results.json``: metrics before training, every ``--eval_steps`` updates, and after training, each with
  ``num_examples`` (gathered across processes without duplicates);
- ``train_results.json``: updates, runtime, tokens/s, the dash switch step; ``training_args.json``: the arguments
  and what they resolved to (adapted layers, head, labels, truncations, notes); ``loss_log.csv``: loss, learning
  rate and elapsed loop time per update; ``tsd_report.csv`` (and ``tsd_report.png`` with matplotlib): per-layer σ, Δσ,
  change rates and the selected directions (``shared.tsd.report``);
- ``checkpoint-<step>/`` every ``--checkpointing_steps`` updates (``accelerator.save_state``: optimizer, scheduler,
  sampler and RNG states, the adapter's native state under ``adapter/``, not the frozen base, and
  ``trainer_state.json``); ``--resume_from_checkpoint DIR|latest`` continues exactly where the run stopped (the
  dash state is restored, never re-selected; tested equal to an uninterrupted run).

Two processes on CPU (gloo): ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2
--num_machines 1 --gpu_ids all apps/train_text.py ...``. ``accelerate launch --cpu --num_processes 2`` starts a
single process on accelerate 1.x (its simple launcher forks only with an mpirun hostfile).

Inside a user's own ``transformers.Trainer`` the same pieces work: ``TaskData.train`` / ``collate_train`` as the
dataset and collator, ``shared.attach`` before the Trainer, ``callbacks=[shared.integrations.TSDCallback(adapter)]``
(``tests/test_text_train.py`` checks both paths select the same directions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader

import shared
from shared.errors import InputError
from shared.io import atomic_write_json
from tsd_common.checkpoints import save_training_checkpoint
from tsd_common.launch import run_cli
from tsd_common.training import (
    init_trackers,
    read_trainer_state,
    register_adapter_hooks,
    start_training,
    write_loss_log,
    write_tsd_report,
)

from . import causal, classification
from .data import (
    PROMPT_TEMPLATES,
    MCExample,
    TaskData,
    ensure_pad_token,
    load_causal,
    load_mc,
    load_text,
    train_eval_split,
)
from .sources import MIXTURES, Source, resolve, subsample

logger = get_logger("tsd_text")  # logs on the main process only
CHECKPOINT_ADAPTER = "adapter"  # sub-directory of a checkpoint with the adapter's native state
LOSS_LOG_COLUMNS = ["step", "epoch", "loss", "lr", "dash_switched", "elapsed_s"]

#: --torch_dtype choices: the dtype of the frozen pretrained weights
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: task name -> (task module: prepare / load_model / compute_metrics / TASK_TYPE, training file loader, evaluation
#: file loader)
TASKS: dict[str, tuple[ModuleType, Callable[..., list], Callable[..., list]]] = {
    "causal-mc": (causal, load_causal, load_mc),
    "classification": (classification, load_text, load_text),
}
MIXTURE_HELP = ", ".join(f"{name}:all or {name}:{','.join(tasks[:2])}" for name, (_, tasks) in MIXTURES.items())


# --------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LoRA / LoRA-Dash / TSD fine-tuning of a transformers text model.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model_name_or_path", required=True, help="local model directory (or hub id when online)")
    g.add_argument("--task", required=True, choices=sorted(TASKS))
    g.add_argument("--train_file", required=True, nargs="+",
                   help="causal-mc: BIG-bench task JSON, LLM-Adapters JSON, question/choices/answer records, Alpaca "
                        "instruction/input/output records or chat messages; classification: CSV/TSV/JSONL; records "
                        "may also come as Parquet. causal-mc takes several: PATH, NAME=PATH (the task's name) or a "
                        f"mixture of a fetched asset's tasks ({MIXTURE_HELP}: their train splits)")
    g.add_argument("--eval_file", "--validation_file", default=None, nargs="+",
                   help="evaluation file(s) with choices, as --train_file (a mixture reads the validation splits); "
                        "with several, the metrics are per task plus their mean (--validation_file: "
                        "run_classification.py's name)")
    g.add_argument("--prompt_template", default="question", choices=PROMPT_TEMPLATES,
                   help="causal-mc, question/choices records: 'Question: ...\\nAnswer: ' + the choice (question), or "
                        "LLM-Adapters' commonsense instruction in the Alpaca template, answered 'the correct answer "
                        "is answer2' (llm-adapters)")
    g.add_argument("--text_column_names", default=None,
                   help="classification: one or two comma-separated text columns (default: text[,text_pair] or "
                        "GLUE's names)")
    g.add_argument("--label_column_name", default="label", help="classification: the label column")
    g.add_argument("--eval_split", type=float, default=None,
                   help="without --eval_file: hold out this fraction (<1) or count (>=1) of --train_file, by --seed")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="at most N training examples in all: the first N of one task; with several tasks an even "
                        "share of N each (a smaller task gives all it has, the rest goes to the others), a random "
                        "sample by --seed")
    g.add_argument("--max_eval_samples", type=int, default=None,
                   help="at most N evaluation examples in all, shared among the tasks as --max_train_samples")
    g.add_argument("--max_length", "--max_seq_length", type=int, default=256,
                   help="longer sequences are truncated (and counted)")
    g.add_argument("--packing", action="store_true",
                   help="causal-mc: pack training rows into bins of --max_length tokens and each batch into one row, "
                        "position ids restarting and no attention across documents")
    g.add_argument("--torch_dtype", default="float32", choices=sorted(TORCH_DTYPES),
                   help="dtype of the frozen pretrained weights (bfloat16/float16 halve their memory; needs "
                        "--mixed_precision); the adapter and a new classification head stay float32")
    g = p.add_argument_group("adapter")
    g.add_argument("--method", default="dash", choices=shared.METHODS)
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=16.0)
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--target_modules", nargs="+", default=None,
                   help="layer names or suffixes, space- or comma-separated (e.g. q_proj,v_proj or query value), "
                        "or all-linear (every linear layer but the LM head and a trained classification head); "
                        "default: peft's for the model type (the query and value projections)")
    g.add_argument("--dash_warmup_steps", type=int, default=100, help="t: optimizer steps of LoRA before the switch")
    g.add_argument("--dash_directions", type=int, default=8, help="s: task-specific directions per layer")
    g.add_argument("--dash_lr_ratio", type=float, default=1.0,
                   help="the learning rate of the dash coefficients λ as a multiple of --learning_rate (1: the "
                        "paper's shared lr)")
    g.add_argument("--adapter_options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="further shared.AdapterConfig fields, e.g. eva_max_batches=16 lora_da_num_samples=64")
    g = p.add_argument_group("training")
    g.add_argument("--learning_rate", type=float, default=5e-4)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--lr_scheduler", "--lr_scheduler_type", default="linear",
                   help="a transformers scheduler name (linear, constant, ...)")
    g.add_argument("--lr_warmup_steps", "--warmup_steps", type=int, default=0)
    g.add_argument("--warmup_ratio", type=float, default=0.0,
                   help="warm up over this fraction of the optimizer steps (rounded up), unless --warmup_steps > 0")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; overrides --num_train_epochs if > 0")
    g.add_argument("--per_device_train_batch_size", type=int, default=8)
    g.add_argument("--per_device_eval_batch_size", type=int, default=None, help="default: the train batch size")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default: accelerate's configuration")
    g.add_argument("--bf16", action="store_true", help="the Trainer's spelling of --mixed_precision bf16")
    g.add_argument("--fp16", action="store_true", help="the Trainer's spelling of --mixed_precision fp16")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start a new run over an earlier one's checkpoints (they are deleted)")
    g.add_argument("--report_to", default="none",
                   help="trackers for loss, learning rate and eval metrics: tensorboard, wandb, ..., all or none "
                        "(accelerate's log_with)")
    g.add_argument("--logging_dir", default="logs", help="the trackers' log dir, relative to --output_dir")
    g.add_argument("--eval_steps", type=int, default=0, help="also evaluate every N optimizer steps (0: no)")
    g.add_argument("--eval_strategy", "--evaluation_strategy", default=None, choices=["no", "steps", "epoch"],
                   help="the Trainer's: epoch evaluates at every epoch's end, steps every --eval_steps, no only "
                        "before and after training (default: steps when --eval_steps is set)")
    g.add_argument("--eval_mode", default="loglik", choices=causal.EVAL_MODES,
                   help="causal-mc: score every choice by its length-normalised log-likelihood (loglik), or generate "
                        "an answer and read the choice off it, as LLM-Adapters and the LoRA-Dash paper do (generate; "
                        "with --prompt_template llm-adapters)")
    g.add_argument("--generation_max_new_tokens", type=int, default=32, help="--eval_mode generate: new tokens")
    g.add_argument("--generation_num_beams", type=int, default=4,
                   help="--eval_mode generate: beams (4 as LLM-Adapters; 1 is greedy)")
    g.add_argument("--eval_before", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the untrained model first (--no-eval_before skips it)")
    g.add_argument("--report_plot", action=argparse.BooleanOptionalAction, default=True,
                   help="also plot the TSD report to tsd_report.png (needs matplotlib; a few seconds)")
    g.add_argument("--checkpointing_steps", "--save_steps", type=int, default=500,
                   help="save a resumable checkpoint-<step> every N optimizer steps (0: never)")
    g.add_argument("--save_strategy", default=None, choices=["no", "steps", "epoch"],
                   help="the Trainer's: epoch saves a checkpoint at every epoch's end, steps every "
                        "--checkpointing_steps, no never (default: steps)")
    g.add_argument("--checkpoints_total_limit", "--save_total_limit", type=int, default=None,
                   help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help='a checkpoint-<step> dir, or "latest" in --output_dir')
    args = p.parse_args(argv)
    if args.target_modules:
        args.target_modules = [t for a in args.target_modules for t in a.split(",") if t]
    if args.text_column_names is not None:
        args.text_column_names = [c.strip() for c in args.text_column_names.split(",") if c.strip()]
    if args.task != "classification" and (args.text_column_names or args.label_column_name != "label"):
        p.error("--text_column_names and --label_column_name apply to --task classification only")
    if args.task == "classification":
        causal_only = [flag for flag, used in (("--packing", args.packing), ("--eval_mode generate",
                       args.eval_mode != "loglik"), ("--prompt_template", args.prompt_template != "question"))
                       if used]
        if causal_only:
            p.error(f"{', '.join(causal_only)}: for --task causal-mc only (a classifier reads each example on its "
                    "own and predicts a label, so it has no documents to pack and no answer to generate)")
        for flag in ("train_file", "eval_file"):
            if len(getattr(args, flag) or []) > 1:
                p.error(f"--{flag}: --task classification reads one file")
    if args.dash_lr_ratio <= 0:
        p.error(f"--dash_lr_ratio must be > 0, got {args.dash_lr_ratio}")
    if args.generation_max_new_tokens < 1 or args.generation_num_beams < 1:
        p.error("--generation_max_new_tokens and --generation_num_beams must be >= 1")
    if args.eval_file is None and args.eval_split is None:
        p.error("give --eval_file, or --eval_split to hold out part of --train_file")
    if args.eval_split is not None and args.eval_split <= 0:
        p.error("--eval_split must be > 0")
    if args.max_length < 2:
        p.error("--max_length must be >= 2")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.eval_steps < 0 or args.checkpointing_steps < 0:
        p.error("--eval_steps and --checkpointing_steps must be >= 0")
    if args.eval_strategy == "steps" and not args.eval_steps:
        p.error("--eval_strategy steps needs --eval_steps N")
    if args.save_strategy == "steps" and not args.checkpointing_steps:
        p.error("--save_strategy steps needs --save_steps N")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        p.error("--checkpoints_total_limit must be >= 1")
    if not 0 <= args.warmup_ratio < 1:
        p.error(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.bf16 and args.fp16:
        p.error("--bf16 and --fp16 exclude each other")
    if args.bf16 or args.fp16:
        asked = "bf16" if args.bf16 else "fp16"
        if args.mixed_precision not in (None, asked):
            p.error(f"--{asked} contradicts --mixed_precision {args.mixed_precision}")
        args.mixed_precision = asked
    args.per_device_eval_batch_size = args.per_device_eval_batch_size or args.per_device_train_batch_size
    args.adapter_options = _key_values(p, args.adapter_options)
    return args


def _key_values(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict of AdapterConfig fields; values are JSON when they parse (numbers, booleans)."""
    flags = {"method", "r", "alpha", "dropout", "target_modules", "modules_to_save", "seed", "dash_warmup_steps",
             "dash_directions", "dash_lr_ratio"}  # set by their own arguments
    known = {f.name for f in dataclasses.fields(shared.AdapterConfig)} - flags
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            parser.error(f"--adapter_options: {item!r} is not KEY=VALUE with KEY an AdapterConfig field "
                         f"({', '.join(sorted(known))})")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class TextTrainConfig:
    """A run's settings, resolved once from the parsed flags (:meth:`from_args`); the fields carry the flags' names
    (``--bf16``/``--fp16`` are in ``mixed_precision``). ``eval_steps`` and ``checkpointing_steps`` are the
    intervals in optimizer steps; :func:`setup` resolves ``--eval_strategy``/``--save_strategy`` into them once
    an epoch's length is known."""

    # model and data
    model_name_or_path: str
    task: str
    train_file: list[str]
    eval_file: list[str] | None
    prompt_template: str
    text_column_names: list[str] | None
    label_column_name: str
    eval_split: float | None
    max_train_samples: int | None
    max_eval_samples: int | None
    max_length: int
    packing: bool
    torch_dtype: str
    # adapter
    method: str
    rank: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str] | None
    dash_warmup_steps: int
    dash_directions: int
    dash_lr_ratio: float
    adapter_options: dict[str, Any]
    # training
    learning_rate: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    lr_scheduler: str
    lr_warmup_steps: int
    warmup_ratio: float
    max_grad_norm: float
    num_train_epochs: int
    max_steps: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    gradient_accumulation_steps: int
    seed: int
    mixed_precision: str | None
    gradient_checkpointing: bool
    # evaluation and outputs
    output_dir: str
    overwrite_output_dir: bool
    report_to: str
    logging_dir: str
    eval_steps: int
    eval_strategy: str | None
    eval_mode: str
    generation_max_new_tokens: int
    generation_num_beams: int
    eval_before: bool
    report_plot: bool
    checkpointing_steps: int
    save_strategy: str | None
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TextTrainConfig:
        """The config of :func:`parse_args`' result (which has checked the flags and resolved their spellings)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def check_torch_dtype(torch_dtype: str, mixed_precision: str) -> None:
    """Refuse a half-precision frozen base without mixed precision (accelerate's ``mixed_precision``)."""
    if torch_dtype != "float32" and mixed_precision == "no":
        raise InputError(f"--torch_dtype {torch_dtype} stores the frozen base in {torch_dtype} but "
                         "--mixed_precision is no: add --mixed_precision bf16 or fp16, whose autocast runs the "
                         "float32 adapter and head at the base's precision")


# ------------------------------------------------------------------------------------------------ model, data
def load_examples(config: TextTrainConfig) -> tuple[list, list]:
    """The training and evaluation examples of every task (``tsd_text.sources``): ``--eval_file``, or
    ``--eval_split`` held out of ``--train_file`` (by ``--seed``), each cut to ``--max_train_samples`` /
    ``--max_eval_samples`` (shared among the tasks)."""
    _, load_train, load_eval = TASKS[config.task]

    def read(load: Callable[..., list], source: Source) -> list:
        if config.task == "classification":
            return load(source.path, text_columns=config.text_column_names, label_column=config.label_column_name)
        return load(source.path, template=config.prompt_template, task=source.task)

    sources = resolve(config.train_file, "train", "--train_file")
    train = [e for source in sources for e in read(load_train, source)]
    if config.eval_file:
        eval_sources = resolve(config.eval_file, "eval", "--eval_file")
        eval_ = [e for source in eval_sources for e in read(load_eval, source)]
    else:
        train, eval_ = train_eval_split(train, config.eval_split, config.seed, " ".join(config.train_file))
        unscorable = next((e for e in eval_ if config.task == "causal-mc" and not isinstance(e, MCExample)), None)
        if unscorable is not None:
            raise InputError(f"--eval_split holds out records of --train_file, and {unscorable.where} has no choices "
                             "to score; give --eval_file with multiple-choice records")
    for flag, cap, examples in (("--max_train_samples", config.max_train_samples, train),
                                ("--max_eval_samples", config.max_eval_samples, eval_)):
        tasks = {e.task for e in examples}
        if cap is not None and cap < len(tasks):
            raise InputError(f"{flag} {cap} is shared among {len(tasks)} tasks and must leave each at least one "
                             "example")
    return subsample(train, config.max_train_samples, config.seed), subsample(eval_, config.max_eval_samples,
                                                                               config.seed)


def default_targets(model: nn.Module) -> list[str] | None:
    """peft's default LoRA targets for the model's ``model_type`` (what ``LoraConfig(target_modules=None)`` picks:
    the query and value projections, e.g. ``q_proj, v_proj`` for LLaMA, ``query, value`` for BERT); None if peft
    has none for it."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    found = PEFT_DEFAULTS.get(getattr(getattr(model, "config", None), "model_type", None))
    return list(found) if found else None


def resolve_targets(model: nn.Module, target_modules: list[str] | None, head: list[str] | None) -> list[str]:
    """Full names of the layers to adapt: what ``target_modules`` (default :func:`default_targets`) matches, minus
    the fully trained head."""
    from shared.layers import find_targets

    found = find_targets(model, target_modules or default_targets(model))  # lists the linear layers if none match
    head = head or []
    names = sorted(n for n in found if not any(n == h or n.startswith(h + ".") for h in head))
    if not names:
        raise InputError(f"target_modules {target_modules} match only modules of the trained head {head}; "
                         "name layers of the base model")
    return names


def adapter_config(config: TextTrainConfig) -> shared.AdapterConfig:
    """The adapter's config from the flags (the target modules as given; :func:`build_model` resolves them)."""
    return shared.AdapterConfig(method=config.method, r=config.rank, alpha=config.lora_alpha,
                                dropout=config.lora_dropout, target_modules=config.target_modules,
                                dash_warmup_steps=config.dash_warmup_steps, dash_directions=config.dash_directions,
                                dash_lr_ratio=config.dash_lr_ratio, seed=config.seed, **config.adapter_options)


@dataclass
class ModelSetup:
    """Everything before ``accelerator.prepare``: validated data, the model with its adapter attached."""

    task: ModuleType
    data: TaskData
    model: nn.Module
    adapter: shared.Adapter
    notes: list[str]


def build_model(config: TextTrainConfig, accelerator: Any, resume_dir: Path | None = None) -> ModelSetup:
    """Checks that need no model first (configuration, files, rows, labels), then tokenizer, model, adapter.

    From a checkpoint the adapter is restored exactly (``shared.load``: no init, no re-selection).
    """
    from transformers import AutoTokenizer

    task = TASKS[config.task][0]
    adapter_cfg = adapter_config(config)
    train_examples, eval_examples = load_examples(config)
    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path)
    notes = [n for n in [ensure_pad_token(tokenizer)] if n]
    options = {} if config.task == "classification" else dict(
        eval_mode=config.eval_mode, max_new_tokens=config.generation_max_new_tokens,
        num_beams=config.generation_num_beams, packed=config.packing)
    data: TaskData = task.prepare(tokenizer, train_examples, eval_examples, config.max_length, **options)
    notes += [f"{n} of {len(getattr(data, split))} {split} examples were longer than --max_length={config.max_length} "
              "and were truncated" for split, n in data.truncated.items() if n]
    model, head = task.load_model(config.model_name_or_path, data, tokenizer, TORCH_DTYPES[config.torch_dtype])
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        # placed as the Trainer places models: the data-driven inits run on the GPU, and a resume recomputes the
        # dash directions with the switch's SVD kernels (LAPACK and cuSOLVER can differ in the last bits)
        model.to(accelerator.device)
    adapter_cfg = dataclasses.replace(adapter_cfg, target_modules=resolve_targets(model, config.target_modules, head),
                                      modules_to_save=head,  # LoRA-DA's population N: the training set, as reference
                                      lora_da_population=adapter_cfg.lora_da_population or len(data.train))
    if not config.target_modules:
        notes.append(f"--target_modules not given: peft's default for model_type {model.config.model_type!r}, "
                     f"{','.join(default_targets(model))}")
    if resume_dir is not None:
        adapter = shared.load(model, resume_dir / CHECKPOINT_ADAPTER)
        saved = (adapter.config.method, adapter.config.r, sorted(adapter.config.target_modules or []),
                 adapter.config.dash_lr_ratio)
        if saved != (adapter_cfg.method, adapter_cfg.r, sorted(adapter_cfg.target_modules), adapter_cfg.dash_lr_ratio):
            raise InputError(f"{resume_dir} holds a {saved[0]} adapter of rank {saved[1]} on {len(saved[2])} layers "
                             f"with dash_lr_ratio {saved[3]:g}; this run asks for {adapter_cfg.method} rank "
                             f"{adapter_cfg.r} on {len(adapter_cfg.target_modules)} layers with dash_lr_ratio "
                             f"{adapter_cfg.dash_lr_ratio:g}")
    else:
        init_data = None
        if adapter_cfg.needs_data:  # the same seeded batches on every process, so every process gets the same init
            init_data = DataLoader(data.train, batch_size=config.per_device_train_batch_size, shuffle=True,
                                   collate_fn=data.collate_train, generator=torch.Generator().manual_seed(config.seed))
        adapter = shared.attach(model, adapter_cfg, data=init_data, progress=accelerator.is_local_main_process)
    if config.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return ModelSetup(task, data, model, adapter, notes)


# ---------------------------------------------------------------------------------------------------- evaluate
def evaluate(accelerator: Any, model: nn.Module, loader: DataLoader, data: TaskData, task: ModuleType,
             desc: str) -> dict[str, float]:
    """Metrics over the whole evaluation set; ``gather_for_metrics`` drops the samples padded in for even batches."""
    from tqdm.auto import tqdm

    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    columns: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        for key, value in accelerator.gather_for_metrics(data.predict(net, batch)).items():
            columns.setdefault(key, []).append(value)
    net.train(was_training)
    cat = {key: torch.cat(values) for key, values in columns.items()}
    return {**task.compute_metrics(cat, data.info), "num_examples": int(cat["ref"].shape[0])}


def metrics_summary(metrics: dict[str, float]) -> str:
    """The metrics on one line; per task as the paper's table has them (each task, then the average)."""
    per_task = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("accuracy/")}
    if not per_task:
        return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    rest = {k: v for k, v in metrics.items() if "/" not in k and k != "accuracy"}
    return (" | ".join(f"{t} {v:.3f}" for t, v in per_task.items()) + f" | average {metrics['accuracy']:.3f}"
            + "".join(f", {k} {v:.4g}" for k, v in rest.items()))


# ------------------------------------------------------------------------------------------------------- setup
@dataclass
class TextRun:
    """A run after :func:`setup`: everything the loop and :func:`finish` use.

    ``config`` has the strategies resolved into ``eval_steps``/``checkpointing_steps``; ``model``, the optimizer,
    scheduler and loaders are prepared by accelerate; ``state`` (evaluations, loss log, tokens, runtime, switch
    step) is what a checkpoint carries besides the adapter, optimizer, scheduler and RNG states.
    """

    config: TextTrainConfig
    accelerator: Any
    task: ModuleType
    data: TaskData
    model: nn.Module
    adapter: shared.Adapter
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    max_steps: int
    notes: list[str]
    resume_dir: Path | None
    state: dict[str, Any]

    def evaluate(self, desc: str) -> dict[str, float]:
        """Metrics on the evaluation set now, logged and sent to the trackers at the adapter's step."""
        metrics = evaluate(self.accelerator, self.model, self.eval_loader, self.data, self.task, desc)
        logger.info(f"eval ({desc}): {metrics_summary(metrics)}")
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.adapter.num_steps)
        return metrics


def setup(config: TextTrainConfig, accelerator: Any, resume_dir: Path | None = None) -> TextRun:
    """Everything before the first step: the model and adapter (:func:`build_model`), the optimizer, loaders and
    scheduler prepared, the checkpoint hooks, the resumed state, the trackers and the evaluation before training."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    set_seed(config.seed)
    built = build_model(config, accelerator, resume_dir)
    data, adapter = built.data, built.adapter
    # λ in a group of its own at dash_lr_ratio × the lr (one group at ratio 1)
    optimizer = torch.optim.AdamW(adapter.param_groups(config.learning_rate, weight_decay=config.weight_decay),
                                  lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon)
    # its own generator: starting an epoch's iterator then draws no number from the global RNG, so a resumed
    # run's dropout masks are those of the uninterrupted run
    rows, collate = (data.train, data.collate_train) if data.packed is None else (data.packed, data.collate_packed)
    train_loader = DataLoader(rows, batch_size=config.per_device_train_batch_size, shuffle=True, collate_fn=collate,
                              generator=torch.Generator().manual_seed(config.seed))
    eval_loader = DataLoader(data.eval, batch_size=config.per_device_eval_batch_size, collate_fn=data.collate_eval)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(built.model, optimizer, train_loader, eval_loader)
    updates_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    max_steps = config.max_steps if config.max_steps > 0 else config.num_train_epochs * updates_per_epoch
    config = dataclasses.replace(
        config, eval_steps={"epoch": updates_per_epoch, "no": 0}.get(config.eval_strategy, config.eval_steps),
        checkpointing_steps={"epoch": updates_per_epoch, "no": 0}.get(config.save_strategy, config.checkpointing_steps))
    world = accelerator.num_processes
    warmup_steps = config.lr_warmup_steps or math.ceil(config.warmup_ratio * max_steps)  # the Trainer's rule
    # a prepared scheduler steps once per process each update, hence the factor (as in diffusers' examples)
    scheduler = accelerator.prepare(get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup_steps * world,
                                                  num_training_steps=max_steps * world))
    if adapter.config.uses_dash and adapter.config.dash_warmup_steps >= max_steps:
        built.notes.append(f"--dash_warmup_steps={adapter.config.dash_warmup_steps} >= {max_steps} optimizer steps: "
                           "the dash phase gets no update, so this run is plain LoRA")
    for note in built.notes:
        logger.warning(note)
    state: dict[str, Any] = {"before": None, "history": [], "loss_log": [], "tokens": 0, "runtime_s": 0.0,
                             "dash_switch_step": None}
    register_adapter_hooks(accelerator, {CHECKPOINT_ADAPTER: adapter}, trainer_state=state)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        state.update(read_trainer_state(resume_dir))
        logger.info(f"resumed from {resume_dir} at step {adapter.num_steps}")
    init_trackers(accelerator, "tsd-text", dataclasses.asdict(config))
    run = TextRun(config, accelerator, built.task, data, model, adapter, optimizer, scheduler, train_loader,
                  eval_loader, max_steps, built.notes, resume_dir, state)
    if config.eval_before and resume_dir is None:
        state["before"] = run.evaluate("eval before")
    return run


# ------------------------------------------------------------------------------------------------------- train
def train_loop(run: TextRun) -> dict[str, Any]:
    """Optimizer steps from ``adapter.num_steps`` (0, or the resumed step) to ``run.max_steps``.

    ``adapter.step`` runs after each; an evaluation every ``--eval_steps`` and a checkpoint every
    ``--checkpointing_steps``. A resumed run skips the batches its checkpoint had consumed in the current
    epoch, so it sees the batches an uninterrupted run would. ``run.state`` gets the loss log, tokens, runtime
    and switch step. Returns the training facts (runtime without evaluation, tokens, dash switch step).
    """
    from tqdm.auto import tqdm

    config, accelerator, adapter, state = run.config, run.accelerator, run.adapter, run.state
    model, optimizer, scheduler, loader = run.model, run.optimizer, run.scheduler, run.train_loader
    max_steps = run.max_steps
    params = adapter.trainable_parameters()
    step = adapter.num_steps
    updates_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    skip = (step % updates_per_epoch) * config.gradient_accumulation_steps
    tokens, eval_time, prior_runtime = 0, 0.0, state["runtime_s"]
    step_loss, micro = torch.zeros((), device=accelerator.device), 0
    bar = tqdm(total=max_steps, initial=step, desc=f"train {config.method}",
               disable=not accelerator.is_local_main_process)
    model.train()
    start = time.perf_counter()
    for epoch in range(step // updates_per_epoch, math.ceil(max_steps / updates_per_epoch)):
        if step >= max_steps:
            break
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel())
            step_loss, micro = step_loss + loss.detach(), micro + 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            if adapter.step(optimizer):
                state["dash_switch_step"] = step
            mean_loss = float(accelerator.reduce(step_loss / micro, "mean"))
            step_loss, micro = torch.zeros_like(step_loss), 0
            lr = scheduler.get_last_lr()[0]
            elapsed = prior_runtime + time.perf_counter() - start - eval_time
            state["loss_log"].append({"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr,
                                      "dash_switched": adapter.switched, "elapsed_s": round(elapsed, 4)})
            accelerator.log({"train/loss": mean_loss, "train/learning_rate": lr}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            evaluate_now = config.eval_steps and step % config.eval_steps == 0
            checkpoint_now = config.checkpointing_steps and step % config.checkpointing_steps == 0
            if step < max_steps and (evaluate_now or checkpoint_now):
                t0 = time.perf_counter()
                state["tokens"] += int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum"))
                tokens = 0
                state["runtime_s"] = prior_runtime + t0 - start - eval_time
                if evaluate_now:
                    state["history"].append({"step": step, **run.evaluate(f"eval step {step}")})
                if checkpoint_now:
                    save_training_checkpoint(accelerator, Path(config.output_dir), step,
                                             config.checkpoints_total_limit)
                eval_time += time.perf_counter() - t0
            if step >= max_steps:
                break
    bar.close()
    state["runtime_s"] = prior_runtime + time.perf_counter() - start - eval_time
    state["tokens"] += int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum"))
    log = state["loss_log"]
    return {"steps": step, "runtime_s": state["runtime_s"], "tokens": state["tokens"],
            "tokens_per_s": state["tokens"] / max(state["runtime_s"], 1e-9),
            "dash_switch_step": state["dash_switch_step"],
            "final_loss": log[-1]["loss"] if log else None, "world_size": accelerator.num_processes}


# ------------------------------------------------------------------------------------------------------ finish
@dataclass
class TrainResult:
    """What :func:`main` returns: the live adapter (on its model), the evaluations with the training facts under
    ``"train"``, and the output directory."""

    adapter: shared.Adapter
    results: dict[str, Any]
    output_dir: Path


def finish(run: TextRun, facts: dict[str, Any]) -> TrainResult:
    """Evaluate after training, write the outputs (main process) and end the trackers."""
    accelerator, out = run.accelerator, Path(run.config.output_dir)
    results = {"before": run.state["before"], "history": run.state["history"], "after": run.evaluate("eval after")}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_outputs(run, results, facts)
        logger.info(f"wrote {out}: before {results['before']}, after {results['after']}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(run.adapter, {**results, "train": facts}, out)


def write_outputs(run: TextRun, results: dict[str, Any], train_results: dict[str, Any]) -> None:
    """The standard LoRA (``PeftModel.from_pretrained`` loads it), ``eval_results.json``, ``train_results.json``,
    ``training_args.json`` (the config and what it resolved to), ``loss_log.csv`` and the TSD report."""
    config, adapter, data, out = run.config, run.adapter, run.data, Path(run.config.output_dir)
    resolved = {"target_modules": adapter.config.target_modules, "modules_to_save": adapter.config.modules_to_save,
                "num_examples": {"train": len(data.train), "eval": len(data.eval)}, "truncated": data.truncated,
                "notes": run.notes, "adapter_config": adapter.config.to_dict(),
                "resumed_from": run.resume_dir and str(run.resume_dir), **data.info}
    shared.export_lora(adapter, out, format="peft", task_type=run.task.TASK_TYPE,
                       base_model_name_or_path=config.model_name_or_path)
    atomic_write_json(out / "eval_results.json", results)
    atomic_write_json(out / "train_results.json", train_results)
    atomic_write_json(out / "training_args.json", {**dataclasses.asdict(config), "resolved": resolved})
    write_loss_log(out, run.state["loss_log"], LOSS_LOG_COLUMNS)
    write_tsd_report(adapter, out, plot=config.report_plot)


# -------------------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> TrainResult:
    """Train and evaluate: the config is resolved, then :func:`setup` -> :func:`train_loop` -> :func:`finish`."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = TextTrainConfig.from_args(args)
    accelerator, resume_dir = start_training(
        output_dir=Path(config.output_dir), logging_dir=config.logging_dir, report_to=config.report_to,
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        resume_from=config.resume_from_checkpoint, overwrite=config.overwrite_output_dir,
        checkpoint_marker=CHECKPOINT_ADAPTER, data_seed=config.seed,
        check=lambda accelerator: check_torch_dtype(config.torch_dtype, accelerator.mixed_precision))
    run = setup(config, accelerator, resume_dir)
    return finish(run, train_loop(run))


def cli(argv: Sequence[str] | None = None) -> None:
    """The ``tsd-train-text`` command (``accelerate launch apps/train_text.py``): a user error is one line on stderr
    and exit status 2 (:func:`tsd_common.launch.run_cli`)."""
    run_cli(lambda: main(parse_args(argv)))
