"""Conversations through the tokenizer's chat template, with the loss on the assistant's turns only.

A conversation m_1 … m_n is rendered once by ``tokenizer.apply_chat_template`` (text, not ids). For each assistant
turn i, the template's rendering of m_1 … m_{i-1} with the generation prompt (``add_generation_prompt=True``: up to
``<|im_start|>assistant\\n`` or the template's equivalent) must be a prefix of the rendering of m_1 … m_i, and that of
the whole conversation; the text between the two is the assistant's turn, its end-of-turn marker included, and is
trained on. Everything else (system and user turns, the role headers) is context: label -100. This is what TRL's
and LLaMA-Factory's assistant-only losses do, and it needs no ``{% generation %}`` markers in the template (which
``return_assistant_tokens_mask`` needs and most templates lack). A template that does not render conversations as
prefixes of each other is refused, naming the record.

The segments are tokenised one by one without added special tokens (the template writes its own BOS, if any), so a
token never straddles a prompt/answer boundary.
"""

from __future__ import annotations

from typing import Any

from .data import Chat, DataError

ASSISTANT = "assistant"


def require_chat_template(tokenizer: Any, where: str) -> None:
    """Refuse a tokenizer without a chat template, naming the first chat record."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise DataError(f"{where}: chat records (messages) need the tokenizer's chat template, and {name} has none "
                        "(no chat_template in tokenizer_config.json or chat_template.jinja); use a model whose "
                        "tokenizer has one (an instruct or chat model), add one to its directory, or give the data "
                        "as Alpaca instruction/input/output records")


def _render(tokenizer: Any, turns: tuple[tuple[str, str], ...], generation_prompt: bool) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def segments(tokenizer: Any, chat: Chat) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces: each assistant turn trained, the rest context."""
    full = _render(tokenizer, chat.messages, False)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, (role, _) in enumerate(chat.messages):
        if role != ASSISTANT:
            continue
        prompt = _render(tokenizer, chat.messages[:i], True)
        upto = _render(tokenizer, chat.messages[: i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= done):
            raise DataError(f"{chat.where}: the tokenizer's chat template does not render the conversation up to "
                            f"assistant turn {i} as a prefix of the whole, so the assistant's tokens cannot be told "
                            "apart from the prompt's")
        pieces += [(full[done:len(prompt)], False), (full[len(prompt):len(upto)], True)]
        done = len(upto)
    pieces.append((full[done:], False))
    return [(text, trained) for text, trained in pieces if text]


def encode(tokenizer: Any, chat: Chat) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained (an assistant turn's)."""
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_trained in segments(tokenizer, chat):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trained += [is_trained] * len(piece)
    return ids, trained
