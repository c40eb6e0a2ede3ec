"""Multiple choice by generation (``--eval_mode generate``): the model writes an answer, the choice is read off it.

This is how LLM-Adapters' ``commonsense_evaluate.py`` scores the eight commonsense tasks, and with it the LoRA-Dash
paper's commonsense table: the instruction in the Alpaca template (``--prompt_template llm-adapters``), beam
search (4 beams) for up to 32 new tokens, then the first of the task's answer names (``answer1``, ``solution2``,
``true`` ...) that occurs in the generated text; no answer name counts as wrong.

:func:`extract_choice` reads the choice off the generated text: the choice whose text occurs first, compared
case-insensitively and only where it is not part of a longer word (``no`` is not found in ``not``); of choices that
start at the same place, the longest (``answer10`` before ``answer1``). It searches the item's own choices (LLM-Adapters
searches every name the task uses, e.g. answer1-5 for a three-choice SIQA item; a name outside the item's choices is
wrong either way, so the two differ only when such a name comes before a valid one). Nothing is sampled
(``do_sample=False``, as theirs: greedy with one beam, beam search with more), so an evaluation is deterministic;
prompts are left-padded into batches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

NO_ANSWER = -1  # the prediction when the generated text names no choice


def extract_choice(text: str, choices: Sequence[str]) -> int:
    """Index of the choice that occurs first in ``text`` (module docstring), or :data:`NO_ANSWER`."""
    best = (len(text) + 1, 0, NO_ANSWER)  # (start, -length, index)
    for i, choice in enumerate(choices):
        needle = choice.strip()
        if not needle:
            continue
        found = re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", text, flags=re.IGNORECASE)
        if found:
            best = min(best, (found.start(), -len(needle), i))
    return best[2]


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   max_new_tokens: int, num_beams: int) -> list[str]:
    """The text each left-padded prompt continues with (special tokens dropped)."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         num_beams=num_beams, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)


def predict(model: nn.Module, batch: dict[str, Any], tokenizer: Any, max_new_tokens: int,
            num_beams: int) -> dict[str, torch.Tensor]:
    """Per example of a ``collate_prompts`` batch: the choice its generated answer names (:func:`extract_choice`,
    :data:`NO_ANSWER` if none), the answer and the task."""
    texts = generate_texts(model, tokenizer, batch["prompt_ids"], batch["prompt_mask"], max_new_tokens, num_beams)
    pred = torch.tensor([extract_choice(t, c) for t, c in zip(texts, batch["choices"], strict=True)],
                        device=batch["answer"].device)
    return {"pred": pred, "ref": batch["answer"], "task": batch["task"]}
