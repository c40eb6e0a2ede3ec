"""``--packing``: causal training rows packed into bins of ``--max_length`` tokens, a batch joined into one row.

Bins are filled best-fit decreasing (each row, longest first, into the fullest bin it still fits; TRL's ``bfd``
strategy): rows are never split. A batch of bins is concatenated into a single row of every document back to back
with, per document,

- position ids restarting at 0, from which transformers builds a block-diagonal causal mask when neither an
  attention mask nor a key/value cache is given (``masking_utils.find_packed_sequence_indices``; with
  FlashAttention-2 the same position ids select its variable-length kernel), so no token attends to another
  document. The batch therefore carries ``use_cache=False``: LLaMA's config asks for a cache even in training, and
  with one transformers silently skips the packed mask, so the documents would attend to each other;
- the label of its first token set to -100: the next-token loss reads the label at t + 1 from the output at t, so
  this keeps the previous document's last token from being trained to predict it.

So a packed batch holds no padding, and its loss (the mean over its trained tokens) and gradients equal those of the
same documents as a padded batch; ``tests/text/test_text_packing.py`` checks this, and that the model's output at
every position is the one it gives the document alone.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from .data import IGNORE_INDEX


def pack(rows: list[dict[str, Any]], capacity: int) -> list[list[dict[str, Any]]]:
    """``rows`` (each no longer than ``capacity`` tokens) in bins of at most ``capacity`` tokens, best-fit
    decreasing; bins in the order they were opened, rows in each in the order they went in."""
    bins: list[list[dict[str, Any]]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"])):
        n = len(rows[i]["input_ids"])
        if n > capacity:
            raise ValueError(f"a row of {n} tokens does not fit bins of {capacity}")
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, b = room.pop(at)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(rows[i])
        if free - n > 0:
            bisect.insort(room, (free - n, b))
    return bins


def collate_packed(bins: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The documents of a batch of bins as one row: ``input_ids``, ``position_ids`` restarting per document,
    ``labels`` with each document's first label -100, and ``use_cache=False`` (module docstring); no
    ``attention_mask``."""
    docs = [row for b in bins for row in b]
    ids = [t for d in docs for t in d["input_ids"]]
    positions = [p for d in docs for p in range(len(d["input_ids"]))]
    labels = [t for d in docs for t in [IGNORE_INDEX, *d["labels"][1:]]]
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "labels": torch.tensor([labels]), "use_cache": False}
