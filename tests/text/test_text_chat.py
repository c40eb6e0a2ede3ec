"""Chat and instruction data: the loss falls on the assistant's turns only, token by token against transformers'
own assistant mask (a template with generation markers) and against SmolLM2's real template; Alpaca records train on
the response and its EOS; mixed into a causal-mc run; the mistakes refused before the model loads."""

import json

import pytest

from tsd_common.assets import asset_path
from tsd_text import causal
from tsd_text.data import IGNORE_INDEX, Chat, load_causal
from tsd_text.tiny import save_tiny_model, word_tokenizer
from tsd_text.train import main, parse_args

#: a template with transformers' generation markers around what the assistant writes
MARKED = ("{% for m in messages %}{% if loop.first %}[BOS] {% endif %}< {{ m['role'] }} > "
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} [SEP]{% endgeneration %}"
          "{% else %}{{ m['content'] }}{% endif %} {% endfor %}{% if add_generation_prompt %}< assistant > {% endif %}")
TALK = ((("system", "be brief"), ("user", "what colour is the sky"), ("assistant", "blue mostly"),
         ("user", "and grass"), ("assistant", "green")),
        (("user", "hi there"), ("assistant", "hello")))


def _tokenizer(template=MARKED):
    texts = [c for talk in TALK for _, c in talk] + ["< system user assistant > [SEP]"]
    tok = word_tokenizer(texts)
    tok.chat_template = template
    return tok


def _as_messages(turns):
    return [{"role": r, "content": c} for r, c in turns]


def test_loss_only_on_assistant_turns_matches_transformers_assistant_mask():
    tok = _tokenizer()
    chats = [Chat(t, f"talk {i}") for i, t in enumerate(TALK)]
    rows, truncated = causal.encode(tok, chats, max_length=512)
    assert truncated == 0
    for talk, row in zip(TALK, rows, strict=True):
        ref = tok.apply_chat_template(_as_messages(talk), tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert row["input_ids"] == ref["input_ids"]
        want = [t if m else IGNORE_INDEX for t, m in zip(ref["input_ids"], ref["assistant_masks"], strict=True)]
        assert row["labels"] == want  # token by token
        trained = tok.decode([t for t in row["labels"] if t != IGNORE_INDEX])
        assert trained == " ".join(f"{c} [SEP]" for r, c in talk if r == "assistant")
    # cut from the right to --max_length, and counted
    rows, truncated = causal.encode(tok, chats[:1], max_length=10)
    assert truncated == 1 and rows[0]["input_ids"] == tok.apply_chat_template(_as_messages(TALK[0]))["input_ids"][:10]


@pytest.mark.real_assets
def test_smollm2_chat_template_tokens_and_assistant_mask():
    """The real template (ChatML, with a default system prompt): the pieces tokenise as the whole conversation does,
    and the trained tokens are each assistant turn with its <|im_end|> and newline, nothing else."""
    from transformers import AutoTokenizer

    path = asset_path("smollm2")
    if path is None:
        pytest.skip("the smollm2 asset is not fetched (python scripts/fetch_assets.py --only smollm2)")
    tok = AutoTokenizer.from_pretrained(path)
    rows, _ = causal.encode(tok, [Chat(t, "x") for t in TALK], max_length=512)
    marked = tok.chat_template.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
        "{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}")
    assert marked != tok.chat_template  # the reference really marks the assistant's turns
    for talk, row in zip(TALK, rows, strict=True):
        ref = tok.apply_chat_template(_as_messages(talk), tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True, chat_template=marked)
        whole = tok.apply_chat_template(_as_messages(talk), tokenize=True)["input_ids"]
        assert row["input_ids"] == whole == ref["input_ids"]
        assert row["labels"] == [t if m else IGNORE_INDEX for t, m in zip(ref["input_ids"], ref["assistant_masks"],
                                                                          strict=True)]
        # without a system turn the template writes its own, which stays context
        assert ("You are a helpful AI assistant" in tok.decode(row["input_ids"])) == (talk[0][0] != "system")


def test_alpaca_records_train_on_the_response_and_its_eos(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "name a colour", "input": "", "output": "blue"},
                                {"instruction": "add", "input": "2 and 2", "output": "4"}]))
    examples = load_causal(path)
    tok = word_tokenizer([e.prompt + e.completion for e in examples])
    rows, _ = causal.encode(tok, examples, max_length=512)
    for e, row in zip(examples, rows, strict=True):
        trained = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert trained == tok(e.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row["input_ids"][: len(row["input_ids"]) - len(trained)] == tok(e.prompt.rstrip())["input_ids"]
    assert "### Input:\n2 and 2" in examples[1].prompt


def _files(tmp_path, template=MARKED):
    chats = tmp_path / "chat.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": _as_messages(t)}) for t in TALK * 6))
    mc = tmp_path / "mc" / "test.jsonl"
    mc.parent.mkdir()
    mc.write_text("\n".join(json.dumps({"question": "what colour is the sky", "choices": ["blue", "green"],
                                        "answer": 0}) for _ in range(4)))
    model = save_tiny_model("llama", tmp_path / "llama", _tokenizer(template))
    return chats, mc, model


def _run(tmp_path, chats, eval_args, model, *extra):
    return main(parse_args(["--model_name_or_path", str(model), "--task", "causal-mc", "--train_file", str(chats),
                            *eval_args, "--method", "lora", "--rank", "2", "--target_modules", "q_proj,v_proj",
                            "--max_steps", "2", "--per_device_train_batch_size", "4", "--no-report_plot",
                            "--output_dir", str(tmp_path / "out"), *extra]))


def test_chat_data_trains_a_causal_mc_run(tmp_path):
    chats, mc, model = _files(tmp_path)
    result = _run(tmp_path, chats, ["--eval_file", str(mc)], model)
    assert result.adapter.num_steps == 2 and result.results["after"]["num_examples"] == 4
    args = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert args["resolved"]["examples_per_task"] == {"train": {"chat": 12}, "eval": {"mc": 4}}


def test_chat_without_a_template_and_evaluation_without_choices_are_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(causal, "load_model", lambda *a: pytest.fail("the model was loaded"))
    chats, mc, model = _files(tmp_path, template=None)
    with pytest.raises(ValueError, match=r"chat.jsonl line 1: chat records \(messages\) need the tokenizer's chat "
                                         r"template, and .* has none"):
        _run(tmp_path, chats, ["--eval_file", str(mc)], model)
    with pytest.raises(ValueError, match=r"chat.jsonl: chat records have no choices, so they cannot be scored"):
        _run(tmp_path, mc, ["--eval_file", str(chats)], model)
    with pytest.raises(ValueError, match=r"--eval_split holds out records of --train_file, and chat.jsonl line \d+ "
                                         r"has no choices to score; give --eval_file"):
        _run(tmp_path, chats, ["--eval_split", "2"], model)
    no_assistant = tmp_path / "user_only.jsonl"
    no_assistant.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(ValueError, match="user_only.jsonl line 1: no assistant turn, so nothing to train on"):
        _run(tmp_path, no_assistant, ["--eval_file", str(mc)], model)
