"""Causal-LM multiple choice: answer-only LM training and length-normalised log-likelihood scoring.

Every (context c, continuation a) pair is one token sequence x = [c; a] with labels -100 on c, so

    training loss     L = -(1/|a|) Σ_t log p(a_t | c, a_<t)           (the LM loss on answer tokens only)
    choice score      s(a) = (1/|a|) Σ_t log p(a_t | c, a_<t)          (per-token mean: length-normalised)
    prediction        argmax_k s(a_k)

so the training target of an example is exactly the sequence that scores its correct choice. Context and
continuation are tokenised separately and concatenated (trailing whitespace of the context moves to the
continuation, as in lm-evaluation-harness), so the answer tokens do not depend on where a BPE merge would fall.
Sequences longer than ``max_length`` lose context tokens from the left (a leading BOS is kept); the answer is cut
only when it alone does not fit. Scoring runs each context once and reuses its key/value cache for every choice,
so an example with k choices costs one context forward plus k short continuation forwards.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .data import DataError, MCExample, TaskData

IGNORE_INDEX = -100
TASK_TYPE = "CAUSAL_LM"


# --------------------------------------------------------------------------------------------------- tokenising
def _move_space(context: str, continuation: str) -> tuple[str, str]:
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def _fit(ctx: list[int], n_answer: int, max_length: int, bos: int | None) -> tuple[list[int], int]:
    """The context cut from the left (a leading BOS kept) and the answer length, so that both fit ``max_length``."""
    if len(ctx) + n_answer <= max_length:
        return ctx, n_answer
    n_answer = min(n_answer, max_length - 1)
    room = max_length - n_answer
    head = ctx[:1] if (bos is not None and ctx[0] == bos and room > 1) else []
    return head + ctx[len(ctx) - (room - len(head)):], n_answer


def _ids(tokenizer: Any, texts: list[str], wheres: list[str], special: bool) -> list[list[int]]:
    """Token ids of ``texts`` (with the tokenizer's special tokens if ``special``); empty results are errors."""
    ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
    for where, text, seq in zip(wheres, texts, ids, strict=True):
        if not seq:
            raise DataError(f"{where}: {text!r} tokenises to no tokens")
    return ids


def encode(tokenizer: Any, examples: list[MCExample], max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """Training rows: ``input_ids`` = context + correct answer, ``labels`` = -100 on the context.

    Returns the rows and how many were truncated to ``max_length``.
    """
    pairs = [_move_space(e.context, e.choices[e.label]) for e in examples]
    wheres = [e.where for e in examples]
    ctx_ids = _ids(tokenizer, [c for c, _ in pairs], wheres, special=True)
    ans_ids = _ids(tokenizer, [a for _, a in pairs], wheres, special=False)
    rows, truncated = [], 0
    for ctx, ans in zip(ctx_ids, ans_ids, strict=True):
        cut, n = _fit(ctx, len(ans), max_length, tokenizer.bos_token_id)
        rows.append({"input_ids": cut + ans[:n], "labels": [IGNORE_INDEX] * len(cut) + ans[:n]})
        truncated += len(cut) + n < len(ctx) + len(ans)
    return rows, truncated


def encode_choices(tokenizer: Any, examples: list[MCExample], max_length: int) -> tuple[list[dict[str, Any]], int]:
    """Evaluation items: the context once, every choice, the answer index. Context + longest choice fit
    ``max_length`` (all choices are scored against the same context). Returns the items and the truncation count."""
    ctx_ids = _ids(tokenizer, [_move_space(e.context, "")[0] for e in examples], [e.where for e in examples],
                   special=True)
    ans_ids = iter(_ids(tokenizer, [_move_space(e.context, c)[1] for e in examples for c in e.choices],
                        [e.where for e in examples for _ in e.choices], special=False))
    items, truncated = [], 0
    for e, ctx in zip(examples, ctx_ids, strict=True):
        answers = [next(ans_ids) for _ in e.choices]
        longest = max(len(a) for a in answers)
        cut, n = _fit(ctx, longest, max_length, tokenizer.bos_token_id)
        items.append({"context": cut, "choices": [a[:n] for a in answers], "label": e.label})
        truncated += len(cut) + n < len(ctx) + longest
    return items, truncated


def prepare(tokenizer: Any, train: list[MCExample], eval: list[MCExample], max_length: int) -> TaskData:
    """Training rows (context + correct choice) and evaluation items (context, every choice, the answer index)."""
    train_rows, cut_train = encode(tokenizer, train, max_length)
    items, cut_eval = encode_choices(tokenizer, eval, max_length)
    items.sort(key=lambda it: len(it["context"]))  # less padding per batch; metrics do not depend on the order
    pad = tokenizer.pad_token_id
    return TaskData(train_rows, items, functools.partial(pad_rows, pad_id=pad),
                    functools.partial(collate_choices, pad_id=pad), {"train": cut_train, "eval": cut_eval},
                    {"num_choices": sorted({len(e.choices) for e in eval})})


# ----------------------------------------------------------------------------------------------------- batching
def _pad(seqs: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of ``seqs`` padded with ``value`` on the right (or the left)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s)
        mask[i, cols] = 1
    return ids, mask


def pad_rows(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (pad id) and ``labels`` (-100); ``attention_mask`` marks the real tokens."""
    ids, mask = _pad([r["input_ids"] for r in rows], pad_id)
    labels, _ = _pad([r["labels"] for r in rows], IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_choices(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Contexts left-padded (E rows, so they all end in the last column), choices right-padded (N rows);
    ``example``/``choice`` give each choice's (example, choice) position, ``answer`` is per example."""
    context_ids, context_mask = _pad([it["context"] for it in items], pad_id, left=True)
    choice_ids, choice_mask = _pad([c for it in items for c in it["choices"]], pad_id)
    return {"context_ids": context_ids, "context_mask": context_mask, "choice_ids": choice_ids,
            "choice_mask": choice_mask,
            "example": torch.tensor([i for i, it in enumerate(items) for _ in it["choices"]]),
            "choice": torch.tensor([j for it in items for j in range(len(it["choices"]))]),
            "answer": torch.tensor([it["label"] for it in items])}


# ------------------------------------------------------------------------------------------------------ scoring
def choice_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """s(a) = (1/|a|) Σ_t log p(a_t | c, a_<t) for every choice of a :func:`collate_choices` batch.

    Each context runs once: its key/value cache is copied to its choices (``reorder_cache`` by example), which
    then run as one right-padded batch; positions come from the masks, so padding changes nothing. Logits are
    kept only where they predict a choice token (the context's last position and the choices' own).
    """
    ctx_mask, ids, mask = batch["context_mask"], batch["choice_ids"], batch["choice_mask"]
    ex = batch["example"]
    out = model(input_ids=batch["context_ids"], attention_mask=ctx_mask,
                position_ids=(ctx_mask.cumsum(1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.reorder_cache(ex)
    positions = ctx_mask.sum(1)[ex].unsqueeze(1) + torch.arange(ids.shape[1], device=ids.device)
    logits = model(input_ids=ids, attention_mask=torch.cat([ctx_mask[ex], mask], 1), position_ids=positions,
                   past_key_values=cache).logits
    predicting = torch.cat([out.logits[ex, -1:], logits[:, :-1]], 1)  # row t predicts choice token t
    keep = mask.bool()
    logp = predicting[keep].float().log_softmax(-1).gather(-1, ids[keep].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(ids.shape[0], dtype=logp.dtype, device=logp.device).index_add_(0, keep.nonzero()[:, 0], logp)
    return sums / keep.sum(1)


@torch.no_grad()
def predict(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted choice, answer) per example of a :func:`collate_choices` batch."""
    scores = choice_logprobs(model, batch)
    table = torch.full((batch["answer"].shape[0], int(batch["choice"].max()) + 1), float("-inf"),
                       device=scores.device)
    table[batch["example"], batch["choice"]] = scores
    return table.argmax(1), batch["answer"]


def compute_metrics(pred: torch.Tensor, ref: torch.Tensor, info: dict[str, Any]) -> dict[str, float]:
    return {"accuracy": float((pred == ref).double().mean())}


def load_model(path: str, data: TaskData, tokenizer: Any,
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[str] | None]:
    """The causal LM with its weights in ``dtype`` (SmolLM2's checkpoint is bf16); a causal LM trains no extra head."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, None
