"""Tiny text models of the real architectures, built from configs (no download), saved like hub snapshots.

For tests and the benchmark fallback: :func:`save_tiny_model` writes a seeded random LLaMA (causal LM), BERT or
DeBERTa-v2 (v3-style relative attention) sequence classifier plus a tokenizer to a directory, so that the trainer
loads it through the ordinary ``from_pretrained`` path. Pass a real tokenizer (SmolLM2's, MiniLM's) when the
assets are fetched; :func:`word_tokenizer` builds a small word-level one from the fixture text otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

KINDS = ("llama", "bert", "deberta")
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[BOS]"]


def word_tokenizer(texts: Iterable[str], kind: str = "llama", pad: bool = True) -> Any:
    """A word-level fast tokenizer trained on ``texts``: BOS-prefixed for ``llama``, ``[CLS] a [SEP] b [SEP]``
    for the encoders. ``pad=False`` leaves the pad token unset (to test the trainer's fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=_SPECIALS))
    ids = {t: tok.token_to_id(t) for t in _SPECIALS}
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", pair="[BOS] $A $B:1",
                                                           special_tokens=[("[BOS]", ids["[BOS]"])])
        special = {"bos_token": "[BOS]", "eos_token": "[SEP]"}
        inputs = ["input_ids", "attention_mask"]
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
        special = {"cls_token": "[CLS]", "sep_token": "[SEP]"}
        inputs = ["input_ids", "token_type_ids", "attention_mask"]
    if pad:
        special["pad_token"] = "[PAD]"
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_input_names=inputs, **special)


def tiny_model(kind: str, vocab_size: int, num_labels: int = 2, pad_token_id: int | None = 0, seed: int = 0) -> Any:
    """A seeded random 2-layer model of ``kind`` (hidden 32) in fp32."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, pad_token_id=pad_token_id)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(num_labels=num_labels, **common))
    cfg = DebertaV2Config(num_labels=num_labels, relative_attention=True, position_buckets=32,
                          pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
                          position_biased_input=False, type_vocab_size=0, **common)
    return DebertaV2ForSequenceClassification(cfg)


def save_tiny_model(kind: str, out_dir: str | Path, tokenizer: Any, num_labels: int = 2, seed: int = 0) -> Path:
    """Build :func:`tiny_model` sized to ``tokenizer`` and save both to ``out_dir`` (``save_pretrained``)."""
    out = Path(out_dir)
    model = tiny_model(kind, len(tokenizer), num_labels, tokenizer.pad_token_id, seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------ toy tasks
_COLORS = {"sky": "blue", "sea": "blue", "grass": "green", "leaf": "green", "banana": "yellow", "sun": "yellow",
           "blood": "red", "rose": "red"}
_WORDS = {1: ["great", "fun", "moving", "smart", "lovely"], 0: ["dull", "awful", "boring", "silly", "weak"]}


def toy_mc_task(n: int, seed: int = 0) -> dict[str, Any]:
    """A BIG-bench task JSON of ``n`` three-choice colour questions (learnable by a tiny model)."""
    import random

    rng = random.Random(seed)
    palette = sorted(set(_COLORS.values()))
    examples = []
    for i in range(n):
        thing = rng.choice(sorted(_COLORS))
        answer = _COLORS[thing]
        choices = rng.sample([c for c in palette if c != answer], 2) + [answer]
        rng.shuffle(choices)
        examples.append({"input": f"What color is the {thing} in picture {i}?",
                         "target_scores": {c: int(c == answer) for c in choices}})
    return {"name": "toy_colors", "description": "colour of things", "examples": examples}


def toy_text_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` toy sentiment rows ``{"text", "label"}`` (labels 0/1, balanced)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(_WORDS[label], 2) + rng.sample(_WORDS[1 - label], 1)
        rows.append({"text": f"the film number {i} was {words[0]} and {words[1]} but a bit {words[2]}",
                     "label": label})
    return rows


def write_toy_mc(root: str | Path, n: int = 30, tokenizer: Any = None, seed: int = 0) -> tuple[Path, Path]:
    """``root/task.json`` (:func:`toy_mc_task`) and a tiny LLaMA in ``root/llama``; returns both paths.

    ``tokenizer`` defaults to a word-level one trained on the task's text."""
    import json

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    task = toy_mc_task(n, seed)
    (root / "task.json").write_text(json.dumps(task))
    texts = [e["input"] + " " + " ".join(e["target_scores"]) for e in task["examples"]] + ["Q: A: choice:"]
    return root / "task.json", save_tiny_model("llama", root / "llama", tokenizer or word_tokenizer(texts, "llama"))


def write_toy_classification(root: str | Path, n_train: int = 28, n_eval: int = 12, tokenizer: Any = None,
                             kind: str = "deberta") -> tuple[Path, Path, Path]:
    """``root/train.csv``, ``root/eval.csv`` (:func:`toy_text_rows`) and a tiny ``kind`` classifier in
    ``root/<kind>``; returns the three paths."""
    import csv

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = toy_text_rows(n_train + n_eval)
    for name, part in (("train.csv", rows[:n_train]), ("eval.csv", rows[n_train:])):
        with open(root / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(part)
    tokenizer = tokenizer or word_tokenizer([r["text"] for r in rows], "bert")
    return root / "train.csv", root / "eval.csv", save_tiny_model(kind, root / kind, tokenizer)
