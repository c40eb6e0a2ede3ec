"""Where the examples come from: ``--train_file`` / ``--eval_file`` as files or named mixtures, and how a sample cap
is shared among their tasks.

A source is one task's file. Each value of ``--train_file`` / ``--eval_file`` (several may follow the flag) is:

- ``PATH``: one file; its task is named after the file (``boolq.json`` -> ``boolq``), or after its directory when
  the file is named for its split (``boolq/test.json``, ``boolq/validation.jsonl`` -> ``boolq``);
- ``NAME=PATH``: one file under the task name ``NAME``;
- ``MIXTURE:all`` or ``MIXTURE:a,b,...``: tasks of a fetched asset (:data:`MIXTURES`), e.g. ``commonsense:all``
  (the eight commonsense tasks of the LoRA-Dash paper) or ``commonsense:boolq,piqa``. ``--train_file`` reads each
  task's ``train.jsonl``, ``--eval_file`` its ``validation.jsonl``.

Sample caps (``--max_train_samples``, ``--max_eval_samples``) count examples in total. With one task they keep the
first N, as they always did. With several, the cap is shared evenly so that every task is represented: each task
gets ⌊N / k⌋ (the first N mod k tasks one more); a task with fewer examples than its share gives all of them and the
rest is shared among the others (:func:`quotas`). Each task's share is a random sample drawn with ``--seed`` (task
files are often ordered by topic or source), kept in file order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import InputError, MissingInputError

#: a mixture's name -> (the asset it reads, its tasks in the order of the paper's table)
MIXTURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "commonsense": ("commonsense", ("boolq", "piqa", "socialiqa", "hellaswag", "winogrande", "arc_easy",
                                    "arc_challenge", "openbookqa")),
}
#: the file of a mixture's task that each flag reads
MIXTURE_FILES = {"train": "train.jsonl", "eval": "validation.jsonl"}
#: file names that name a split rather than a task: such a file's task is its directory's name
SPLIT_NAMES = {"train", "training", "validation", "valid", "val", "dev", "test", "eval"}


@dataclass(frozen=True)
class Source:
    """One task's file."""

    task: str
    path: Path


def task_name(path: Path) -> str:
    """The task a file holds, from its name: the stem, or the directory's name when the stem names a split."""
    stem = path.name.split(".")[0]
    return path.parent.name if stem.lower() in SPLIT_NAMES and path.parent.name else stem


def mixture_sources(spec: str, split: str, flag: str) -> list[Source]:
    """The sources of ``MIXTURE:all`` / ``MIXTURE:a,b`` for ``split`` (``train`` or ``eval``)."""
    from tsd_common.assets import AssetMissingError, require_asset

    name, _, wanted = spec.partition(":")
    asset, tasks = MIXTURES[name]
    chosen = list(tasks) if wanted.strip() == "all" else [t.strip() for t in wanted.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in tasks]
    if not chosen or unknown:
        raise InputError(f"{flag} {spec}: {'unknown task(s) ' + ', '.join(unknown) if unknown else 'no task named'}; "
                         f"{name} has {', '.join(tasks)} (or {name}:all)")
    if len(set(chosen)) < len(chosen):
        raise InputError(f"{flag} {spec}: a task is named twice")
    try:
        root = require_asset(asset)
    except AssetMissingError as err:
        raise MissingInputError(f"{flag} {spec}: {err}") from err
    return [Source(t, root / t / MIXTURE_FILES[split]) for t in chosen]


def resolve(specs: Sequence[str], split: str, flag: str) -> list[Source]:
    """The sources of a flag's values (module docstring); task names must be distinct."""
    out: list[Source] = []
    for spec in specs:
        head = spec.partition(":")[0]
        if ":" in spec and head in MIXTURES:
            out += mixture_sources(spec, split, flag)
        elif "=" in spec and not Path(spec).exists():
            name, _, path = spec.partition("=")
            if not name.strip() or not path.strip():
                raise InputError(f"{flag} {spec!r}: expected NAME=PATH")
            out.append(Source(name.strip(), Path(path)))
        else:
            out.append(Source(task_name(Path(spec)), Path(spec)))
    names = [s.task for s in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"{flag}: task name(s) {', '.join(twice)} given to more than one file; name each file's "
                         "task with NAME=PATH")
    return out


def quotas(sizes: Sequence[int], total: int) -> list[int]:
    """How many of each task's ``sizes`` examples a cap of ``total`` keeps: an even share each, a smaller task all of
    its examples and the rest shared among the others (the first tasks in order get the remainder)."""
    share = [0] * len(sizes)
    left = sorted(range(len(sizes)), key=lambda i: sizes[i])
    remaining = total
    while left:
        even = remaining // len(left)
        if sizes[left[0]] <= even:
            i = left.pop(0)
            share[i] = sizes[i]
            remaining -= sizes[i]
            continue
        extra = remaining - even * len(left)
        for j, i in enumerate(sorted(left)):  # every task left has more than `even`, so one more fits
            share[i] = even + (j < extra)
        break
    return share


def subsample(examples: list[Any], total: int | None, seed: int) -> list[Any]:
    """At most ``total`` of ``examples`` (each with a ``task``): the first ``total`` of a single task, else every
    task's :func:`quotas` share, a seeded random sample of it in file order; tasks in order of first appearance."""
    if total is None or total >= len(examples):
        return examples
    by_task: dict[str, list[Any]] = {}
    for e in examples:
        by_task.setdefault(e.task, []).append(e)
    if len(by_task) == 1:
        return examples[:total]
    out = []
    for (task, items), n in zip(by_task.items(), quotas([len(v) for v in by_task.values()], total), strict=True):
        keep = sorted(random.Random(f"{seed}:{task}").sample(range(len(items)), n))
        out += [items[i] for i in keep]
    return out
