"""Causal-LM multiple choice: answer-only masking against the tokenizer, truncation, and batched
length-normalised log-likelihood scoring against a brute-force per-choice, per-token loop."""

import itertools

import pytest
import torch

from tsd_common.assets import asset_path
from tsd_text import causal
from tsd_text.data import MCExample
from tsd_text.tiny import tiny_model, word_tokenizer

TEXTS = ["Q: What color is the sky?\nA:", "blue", "green", "red", "a rather long answer with many words",
         "Below is an instruction. the correct answer is true false"]


def _tokenizer():
    """The real SmolLM2 BPE tokenizer when fetched, else a word-level stand-in (BOS-prefixed)."""
    from transformers import AutoTokenizer

    path = asset_path("smollm2")
    return AutoTokenizer.from_pretrained(path) if path else word_tokenizer(TEXTS + ["the sky"], "llama")


def _mc(context, *choices, label=0):
    return MCExample(context, tuple(choices), label, "test")


def test_labels_mask_the_prompt_and_keep_exactly_the_answer_tokens():
    tok = _tokenizer()
    pairs = [("Q: What color is the sky?\nA: ", "blue"), ("the correct answer is ", "true"),
             ("Q: What color is the sky?\nA:", " a rather long answer with many words")]
    rows, truncated = causal.encode(tok, [_mc(c, a) for c, a in pairs], max_length=128)
    assert truncated == 0
    for (context, answer), row in zip(pairs, rows, strict=True):
        ids, labels = torch.tensor(row["input_ids"]), torch.tensor(row["labels"])
        ctx = tok(context.rstrip())["input_ids"]
        ans = tok(" " + answer.lstrip(), add_special_tokens=False)["input_ids"]  # the context's space moved over
        assert ids.tolist() == ctx + ans
        assert (labels[: len(ctx)] == -100).all() and labels[len(ctx):].tolist() == ans
        assert tok.decode(ids[labels != -100]).strip() == answer.strip()


def test_truncation_cuts_the_context_from_the_left_keeps_bos_and_counts():
    tok = word_tokenizer(TEXTS, "llama")
    bos = tok.bos_token_id
    long_ctx = "Q: " + " ".join(["sky"] * 40) + "\nA:"
    rows, truncated = causal.encode(tok, [_mc(long_ctx, " blue"), _mc("Q:", " blue"), _mc("Q:", " " + TEXTS[4])],
                                    max_length=6)
    assert truncated == 2
    long_row, short_row, cut_answer = rows
    assert len(long_row["input_ids"]) == 6 and long_row["input_ids"][0] == bos
    assert long_row["input_ids"][-2:] == tok("\nA: blue", add_special_tokens=False)["input_ids"][-2:]
    assert long_row["labels"][:-1] == [-100] * 5 and long_row["labels"][-1] == tok.convert_tokens_to_ids("blue")
    assert short_row["input_ids"] == tok("Q: blue")["input_ids"]
    assert (len(cut_answer["input_ids"]) == 6 and cut_answer["labels"][0] == -100
            and -100 not in cut_answer["labels"][1:])
    # evaluation: one context per example, cut so that it fits with the longest choice
    items, truncated = causal.encode_choices(tok, [_mc(long_ctx, "blue", "red sky"), _mc("Q:", "blue", "red")], 6)
    assert truncated == 1 and items[0]["context"][0] == bos and len(items[0]["context"]) == 4
    assert items[0]["choices"] == [tok(" blue", add_special_tokens=False)["input_ids"],
                                   tok(" red sky", add_special_tokens=False)["input_ids"]]
    assert items[1]["context"] == tok("Q:")["input_ids"]


def _brute_force_scores(model, items):
    """Per choice: an unpadded forward of context + choice, then a Python loop over the choice tokens."""
    out = []
    for item in items:
        for choice in item["choices"]:
            ids = item["context"] + choice
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            n = len(item["context"])
            out.append(torch.stack([logp[t - 1, ids[t]] for t in range(n, len(ids))]).mean())
    return torch.stack(out)


@torch.no_grad()
def test_batched_scoring_matches_brute_force_loop_on_tiny_llama():
    tok = word_tokenizer(TEXTS, "llama")
    model = tiny_model("llama", len(tok), pad_token_id=tok.pad_token_id, seed=3).eval()
    examples = [_mc("Q: What color is the sky?\nA: ", "blue", "green", "red"),
                _mc("the correct answer is ", "true", "false", label=1),
                _mc("Q: What", "blue", "a rather long answer with many words", "sky", "red", label=2)]
    data = causal.prepare(tok, examples, examples, max_length=64)
    batch = data.collate_eval(data.eval)
    assert batch["choice_ids"].shape[0] == 9 and batch["choice_mask"].min() == 0  # flattened, padded choices
    assert batch["context_mask"][:, 0].tolist() == [0, 0, 1]  # sorted by length, left-padded
    scores = causal.choice_logprobs(model, batch)
    brute = _brute_force_scores(model, data.eval)
    torch.testing.assert_close(scores, brute, atol=1e-5, rtol=1e-5)
    columns = data.predict(model, batch)
    pred, answer = columns["pred"], columns["ref"]
    bounds = torch.tensor([0] + [len(it["choices"]) for it in data.eval]).cumsum(0).tolist()
    expected = [int(torch.argmax(brute[s:e])) for s, e in itertools.pairwise(bounds)]
    assert pred.tolist() == expected and answer.tolist() == [it["label"] for it in data.eval] == [2, 1, 0]
    assert causal.compute_metrics(columns, data.info)["accuracy"] == pytest.approx(
        sum(p == a for p, a in zip(expected, [2, 1, 0], strict=True)) / 3)
    # the training row of an example is its context followed by its correct choice
    assert data.train[1]["input_ids"] == data.eval[1]["context"] + data.eval[1]["choices"][1]
