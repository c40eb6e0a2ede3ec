"""Causal LMs: answer-only LM training, multiple choice scored by length-normalised log-likelihood or by generation.

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

Training rows may also come from instruction data: an Alpaca record is (prompt, output + EOS), trained on the output
and the EOS; a conversation goes through the chat template with the loss on the assistant's turns
(``tsd_text.chat``) and is cut from the right. With ``eval_mode="generate"`` the evaluation generates from each
item's prompt and reads the choice off the text (``tsd_text.generation``). With several evaluation tasks the
metrics are per task plus their unweighted mean, the paper's "Avg".
"""

from __future__ import annotations

import functools
import statistics
from typing import Any

import torch
from torch import nn

from . import chat, generation, packing
from .data import IGNORE_INDEX, Chat, Completion, DataError, MCExample, TaskData

TASK_TYPE = "CAUSAL_LM"
EVAL_MODES = ("loglik", "generate")


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


def encode(tokenizer: Any, examples: list[MCExample | Completion | Chat],
           max_length: int) -> tuple[list[dict[str, list[int]]], int]:
    """Training rows: ``input_ids`` = context + correct answer (a completion + EOS; a rendered conversation),
    ``labels`` = -100 but on the answer (the assistant's turns).

    Returns the rows, in the order of ``examples``, and how many were truncated to ``max_length``.
    """
    rows: list[dict[str, list[int]]] = [{} for _ in examples]
    truncated = 0
    paired = [(i, e) for i, e in enumerate(examples) if not isinstance(e, Chat)]
    if paired:
        pairs = [_move_space(e.context, e.choices[e.label]) if isinstance(e, MCExample)
                 else _move_space(e.prompt, e.completion) for _, e in paired]
        wheres = [e.where for _, e in paired]
        ctx_ids = _ids(tokenizer, [c for c, _ in pairs], wheres, special=True)
        ans_ids = _ids(tokenizer, [a for _, a in pairs], wheres, special=False)
        eos = tokenizer.eos_token_id
        for (i, e), ctx, ans in zip(paired, ctx_ids, ans_ids, strict=True):
            if isinstance(e, Completion) and eos is not None:
                ans = [*ans, eos]  # the model learns where the response ends
            cut, n = _fit(ctx, len(ans), max_length, tokenizer.bos_token_id)
            rows[i] = {"input_ids": cut + ans[:n], "labels": [IGNORE_INDEX] * len(cut) + ans[:n]}
            truncated += len(cut) + n < len(ctx) + len(ans)
    for i, e in enumerate(examples):
        if isinstance(e, Chat):
            ids, trained = chat.encode(tokenizer, e)
            if not ids:
                raise DataError(f"{e.where}: the conversation renders to no tokens")
            truncated += len(ids) > max_length
            ids, trained = ids[:max_length], trained[:max_length]
            rows[i] = {"input_ids": ids,
                       "labels": [t if k else IGNORE_INDEX for t, k in zip(ids, trained, strict=True)]}
    return rows, truncated


def encode_choices(tokenizer: Any, examples: list[MCExample], max_length: int,
                   tasks: list[str] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Evaluation items: the context once, every choice, the answer index and the task's index in ``tasks``
    (default: every example's task is the first's). Context + longest choice fit ``max_length`` (all choices are
    scored against the same context). Returns the items and the truncation count."""
    tasks = tasks or [examples[0].task]
    ctx_ids = _ids(tokenizer, [_move_space(e.context, "")[0] for e in examples], [e.where for e in examples],
                   special=True)
    ans_ids = iter(_ids(tokenizer, [_move_space(e.context, c)[1] for e in examples for c in e.choices],
                        [e.where for e in examples for _ in e.choices], special=False))
    items, truncated = [], 0
    for e, ctx in zip(examples, ctx_ids, strict=True):
        answers = [next(ans_ids) for _ in e.choices]
        longest = max(len(a) for a in answers)
        cut, n = _fit(ctx, longest, max_length, tokenizer.bos_token_id)
        items.append({"context": cut, "choices": [a[:n] for a in answers], "label": e.label,
                      "task": tasks.index(e.task)})
        truncated += len(cut) + n < len(ctx) + longest
    return items, truncated


def encode_prompts(tokenizer: Any, examples: list[MCExample], max_length: int,
                   tasks: list[str]) -> tuple[list[dict[str, Any]], int]:
    """Generation items: the prompt (cut from the left to ``max_length``, a leading BOS kept), the choices' texts,
    the answer index and the task's index in ``tasks``. Returns the items and the truncation count."""
    prompts = _ids(tokenizer, [e.generation_prompt for e in examples], [e.where for e in examples], special=True)
    items, truncated = [], 0
    for e, ids in zip(examples, prompts, strict=True):
        cut, _ = _fit(ids, 0, max_length, tokenizer.bos_token_id)
        items.append({"prompt": cut, "choices": list(e.choices), "label": e.label, "task": tasks.index(e.task)})
        truncated += len(cut) < len(ids)
    return items, truncated


def prepare(tokenizer: Any, train: list[MCExample | Completion | Chat], eval: list[MCExample], max_length: int, *,
            eval_mode: str = "loglik", max_new_tokens: int = 32, num_beams: int = 4, packed: bool = False) -> TaskData:
    """Training rows (context + correct choice, completions, conversations; packed into bins of ``max_length``
    tokens if ``packed``) and evaluation items: for ``loglik`` the context, every choice and the answer index; for
    ``generate`` the prompt, the choices' texts and the answer index."""
    chats = [e for e in train if isinstance(e, Chat)]
    if chats:
        chat.require_chat_template(tokenizer, chats[0].where)
    train_rows, cut_train = encode(tokenizer, train, max_length)
    tasks = list(dict.fromkeys(e.task for e in eval))
    pad = tokenizer.pad_token_id
    if eval_mode == "loglik":
        items, cut_eval = encode_choices(tokenizer, eval, max_length, tasks)
        items.sort(key=lambda it: len(it["context"]))  # less padding per batch; metrics do not depend on the order
        collate_eval, predict_fn = functools.partial(collate_choices, pad_id=pad), predict
    elif eval_mode == "generate":
        items, cut_eval = encode_prompts(tokenizer, eval, max_length, tasks)
        items.sort(key=lambda it: len(it["prompt"]))
        collate_eval = functools.partial(collate_prompts, pad_id=pad)
        predict_fn = functools.partial(generation.predict, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                                       num_beams=num_beams)
    else:
        raise ValueError(f"unknown eval mode {eval_mode!r}; choose one of {', '.join(EVAL_MODES)}")
    info = {"num_choices": sorted({len(e.choices) for e in eval}), "tasks": tasks, "eval_mode": eval_mode,
            "examples_per_task": {"train": _counts(train), "eval": _counts(eval)}}
    bins = packing.pack(train_rows, max_length) if packed else None
    if bins is not None:
        tokens = sum(len(r["input_ids"]) for r in train_rows)
        info["packing"] = {"rows": len(train_rows), "bins": len(bins), "fill": tokens / (len(bins) * max_length)}
    return TaskData(train_rows, items, functools.partial(pad_rows, pad_id=pad), collate_eval,
                    {"train": cut_train, "eval": cut_eval}, predict_fn, info, bins,
                    packing.collate_packed if packed else None)


def _counts(examples: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        out[e.task] = out.get(e.task, 0) + 1
    return out


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
            "answer": torch.tensor([it["label"] for it in items]), "task": torch.tensor([it["task"] for it in items])}


def collate_prompts(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Prompts left-padded for generation; ``choices`` stays a list (of each example's choice texts)."""
    prompt_ids, prompt_mask = _pad([it["prompt"] for it in items], pad_id, left=True)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "choices": [it["choices"] for it in items],
            "answer": torch.tensor([it["label"] for it in items]), "task": torch.tensor([it["task"] for it in items])}


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
def predict(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per example of a :func:`collate_choices` batch: the predicted choice, the answer and the task."""
    scores = choice_logprobs(model, batch)
    table = torch.full((batch["answer"].shape[0], int(batch["choice"].max()) + 1), float("-inf"),
                       device=scores.device)
    table[batch["example"], batch["choice"]] = scores
    return {"pred": table.argmax(1), "ref": batch["answer"], "task": batch["task"]}


def compute_metrics(columns: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, float]:
    """``accuracy``; with several tasks, ``accuracy/<task>`` and ``num_examples/<task>`` each and ``accuracy`` their
    unweighted mean (the paper's "Avg"); with generation, ``no_answer``: the share of answers that named no choice."""
    pred, ref, task = (columns[k].cpu() for k in ("pred", "ref", "task"))
    correct = (pred == ref).double()
    names = info.get("tasks") or [""]
    out: dict[str, float] = {"accuracy": float(correct.mean())}
    if len(names) > 1:
        per_task = {name: correct[task == i] for i, name in enumerate(names)}
        out = {"accuracy": statistics.mean(float(c.mean()) for c in per_task.values()),
               **{f"accuracy/{name}": float(c.mean()) for name, c in per_task.items()},
               **{f"num_examples/{name}": int(c.numel()) for name, c in per_task.items()}}
    if info.get("eval_mode") == "generate":
        out["no_answer"] = float((pred == generation.NO_ANSWER).double().mean())
    return out


def load_model(path: str, data: TaskData, tokenizer: Any,
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[str] | None]:
    """The causal LM with its weights in ``dtype`` (SmolLM2's checkpoint is bf16); a causal LM trains no extra head."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, None
