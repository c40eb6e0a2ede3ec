"""Text trainer inputs: format auto-detection, prompts, and every bad-input error naming its file and row."""

import csv
import json

import pytest

from tsd_text.classification import prepare as prepare_classification
from tsd_text.data import DataError, alpaca_prompt, ensure_pad_token, load_mc, load_text, read_records, train_eval_split
from tsd_text.tiny import word_tokenizer

BOOLQ = {"instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
                        "Answer format: true/false",
         "input": "", "output": "the correct answer is true", "answer": "true"}
PIQA = {"instruction": "Please choose the correct solution to the question: open a jar\n\nSolution1: twist the lid\n"
                       "Solution2: shout at it\n\nAnswer format: solution1/solution2",
        "input": "", "output": "the correct answer is solution2", "answer": "solution2"}


def _json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def _csv(path, rows, header=("text", "label"), delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------- detection
def test_bigbench_task_json_is_detected_and_prompted_like_bigbench(tmp_path):
    task = {"name": "t", "append_choices_to_input": True,
            "examples": [{"input": "Who?", "target_scores": {"Ann": 0, "Bob": 1, "Cy": 0}}]}
    [ex] = load_mc(_json(tmp_path / "task.json", task))
    assert read_records(tmp_path / "task.json").format == "bigbench"
    assert ex.context == "Q: Who?\n  choice: Ann\n  choice: Bob\n  choice: Cy\nA: "
    assert ex.choices == ("Ann", "Bob", "Cy") and ex.label == 1 and ex.where == "task.json examples[0]"
    task.update(append_choices_to_input=False, task_prefix="Quiz.", example_input_prefix="\nQuestion: ",
                example_output_prefix="\nAnswer: ")
    [ex] = load_mc(_json(tmp_path / "task.json", task))
    assert ex.context == "Quiz.\nQuestion: Who?\nAnswer: "


def test_llm_adapters_json_and_jsonl_choices_from_answer_format(tmp_path):
    explicit = {**BOOLQ, "input": "some context", "choices": ["yes", "no"], "answer": "no",
                "output": "the correct answer is no"}
    exs = load_mc(_json(tmp_path / "c.json", [BOOLQ, PIQA, explicit]))
    assert read_records(tmp_path / "c.json").format == "llm-adapters"
    assert [e.choices for e in exs] == [("true", "false"), ("solution1", "solution2"), ("yes", "no")]
    assert [e.label for e in exs] == [0, 1, 1]
    assert exs[0].context == alpaca_prompt(BOOLQ["instruction"]) + "the correct answer is "
    assert exs[0].context.startswith("Below is an instruction that describes a task. Write")
    assert ("### Input:\nsome context\n\n### Response:\n" in exs[2].context
            and ", paired with an input" in exs[2].context)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in [BOOLQ, PIQA]) + "\n")
    assert [e.label for e in load_mc(tmp_path / "c.jsonl")] == [0, 1]


def test_classification_tables_csv_tsv_jsonl_json(tmp_path):
    rows = [("good film", "a", 1), ("bad film", "b", 0)]
    header = ("text", "text_pair", "label")
    files = [_csv(tmp_path / "d.csv", rows, header), _csv(tmp_path / "d.tsv", rows, header, "\t")]
    records = [dict(zip(header, r, strict=True)) for r in rows]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    files += [tmp_path / "d.jsonl", _json(tmp_path / "d.json", records)]
    for f in files:
        exs = load_text(f)
        assert read_records(f).format == "table"
        assert [(e.text, e.text_pair, str(e.label)) for e in exs] == [("good film", "a", "1"), ("bad film", "b", "0")]
    assert load_text(files[0])[1].where == "d.csv line 3" and load_text(files[2])[0].where == "d.jsonl line 1"
    one = load_text(_json(tmp_path / "one.json", records[0]))  # JSON lines of one line
    assert [(e.text, e.where) for e in one] == [("good film", "one.json line 1")]


@pytest.mark.parametrize("header, want_pair", [
    (("sentence", "label", "idx"), False),  # SST-2, CoLA as datasets' to_csv writes them
    (("sentence1", "sentence2", "label", "idx"), True),  # MRPC, RTE, STS-B
    (("question", "sentence", "label", "idx"), True),  # QNLI
    (("question1", "question2", "label", "idx"), True),  # QQP
    (("premise", "hypothesis", "label", "idx"), True),  # MNLI
])
def test_glue_column_names_are_recognised(tmp_path, header, want_pair):
    row = {"label": 1, "idx": 0, **{k: f"{k} words" for k in header if k not in ("label", "idx")}}
    (tmp_path / "g.jsonl").write_text(json.dumps(row) + "\n")
    for f in (_csv(tmp_path / "g.csv", [tuple(row[k] for k in header)], header), tmp_path / "g.jsonl"):
        (ex,) = load_text(f)
        assert ex.text == f"{header[0]} words" and str(ex.label) == "1"
        assert ex.text_pair == (f"{header[1]} words" if want_pair else None)


def test_named_text_and_label_columns(tmp_path):
    rows = [("a review", "a title", "pos"), ("another", "t2", "neg")]
    f = _csv(tmp_path / "r.csv", rows, header=("review", "title", "sentiment"))
    exs = load_text(f, text_columns=["review", "title"], label_column="sentiment")
    assert [(e.text, e.text_pair, e.label) for e in exs] == rows
    (tmp_path / "r.jsonl").write_text(json.dumps({"review": "x", "sentiment": "pos"}))
    assert [(e.text, e.label) for e in load_text(tmp_path / "r.jsonl", ["review"], "sentiment")] == [("x", "pos")]
    with pytest.raises(DataError, match=r"--text_column_names body must name one or two of the columns"):
        load_text(f, text_columns=["body"], label_column="sentiment")


def test_question_choices_answer_records(tmp_path):
    """Generic multiple choice: plain lists with an index or the answer's text, and ARC's labelled choices."""
    rows = [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
        {"input": "Sky colour?", "choices": ["blue", "green", "red"], "answer": "blue"},
        {"question_stem": "Ice is", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]}, "answerKey": "B",
         "id": "x"},
    ]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    exs = load_mc(tmp_path / "mc.jsonl")
    assert [(e.context, e.choices, e.label) for e in exs] == [
        ("Question: 2+2?\nAnswer: ", ("3", "4"), 1),
        ("Question: Sky colour?\nAnswer: ", ("blue", "green", "red"), 0),
        ("Question: Ice is\nAnswer: ", ("hot", "cold"), 1)]
    assert exs[2].where == "mc.jsonl line 3" and read_records(tmp_path / "mc.jsonl").format == "choices"
    for bad, match in [({"answer": 2}, r"'answer' 2 is neither a 0-based index below 2"),
                       ({"answer": "5"}, r"'answer' '5' is neither"), ({"answer": True}, "'answer' True is neither"),
                       ({"choices": ["only"]}, "a multiple-choice example needs at least 2"),
                       ({"choices": "a/b"}, "'choices' must be a list")]:
        (tmp_path / "bad.json").write_text(json.dumps([rows[0], {**rows[0], **bad}]))
        with pytest.raises(DataError, match=r"bad.json \[1\]: " + match):
            load_mc(tmp_path / "bad.json")


def test_parquet_records_as_the_hub_serves_them(tmp_path):
    """Parquet (what ``datasets`` on the Hub stores): typed columns, nulls, nested choices, row names, bad files."""
    import pyarrow
    import pyarrow.parquet

    sst2 = [{"sentence": "a gem", "label": 1, "idx": 0}, {"sentence": "a dud", "label": 0, "idx": 1}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(sst2), tmp_path / "sst2.parquet")
    (tmp_path / "sst2.jsonl").write_text("\n".join(json.dumps(r) for r in sst2))
    got, want = load_text(tmp_path / "sst2.parquet"), load_text(tmp_path / "sst2.jsonl")
    assert [(e.text, e.text_pair, e.label) for e in got] == [(e.text, e.text_pair, e.label) for e in want]
    assert [e.where for e in got] == ["sst2.parquet row 0", "sst2.parquet row 1"]
    assert isinstance(got[0].label, int)

    arc = [{"question": "Ice is", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]}, "answerKey": "B"}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(arc), tmp_path / "arc.parquet")
    assert [(e.choices, e.label) for e in load_mc(tmp_path / "arc.parquet")] == [(("hot", "cold"), 1)]

    holes = [{"sentence": "fine", "label": 1}, {"sentence": None, "label": 0}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(holes), tmp_path / "holes.parquet")
    with pytest.raises(DataError, match=r"holes.parquet row 1: missing 'sentence'"):
        load_text(tmp_path / "holes.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable Parquet file"):
        load_text(tmp_path / "bad.parquet")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(sst2).slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty.parquet: the dataset is empty"):
        load_text(tmp_path / "empty.parquet")


def test_split_is_fixed_by_seed():
    items = list(range(50))
    a, b = train_eval_split(items, 0.2, seed=3, path="x")
    assert len(b) == 10 and sorted(a + b) == items
    assert (a, b) == train_eval_split(items, 10, seed=3, path="x")
    assert b != train_eval_split(items, 10, seed=4, path="x")[1]
    with pytest.raises(DataError, match="at least one for each"):
        train_eval_split(items, 50, seed=0, path="x")


# ------------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_mc(tmp_path / "nope.json")


@pytest.mark.parametrize("content,match", [
    ("hello world\nnot json", r"unknown format \(not JSON\)"),
    ("[1, 2]", r"unknown format \(a JSON list\)"),
    ('{"name": "x", "data": []}', r"unknown format: the first record has keys \['data', 'name'\]"),
    ('[{"question": "q", "y": 1}]', r"first record has keys \['question', 'y'\]"),
    ("", "the file is empty"),
    ("[]", "the dataset is empty"),
    ('{"examples": []}', "the dataset is empty"),
])
def test_unknown_or_empty_files(tmp_path, content, match):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as err:
        load_mc(path)
    assert "data.json" in str(err.value)


def test_wrong_format_for_the_task_says_which_task(tmp_path):
    csv_file = _csv(tmp_path / "d.csv", [("x", 1)])
    with pytest.raises(DataError, match="causal-mc needs a BIG-bench task JSON"):
        load_mc(csv_file)
    with pytest.raises(DataError, match="use --task causal-mc"):
        load_text(_json(tmp_path / "t.json", {"examples": [{"input": "q", "target_scores": {"a": 1, "b": 0}}]}))


@pytest.mark.parametrize("rows,match", [
    ([("good", "1"), ("bad", "")], "d.csv line 3: missing 'label'"),
    ([("good", "1"), ("", "0")], "d.csv line 3: missing 'text'"),
])
def test_missing_classification_fields_name_the_line(tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        load_text(_csv(tmp_path / "d.csv", rows))


def test_csv_without_label_column_and_empty_csv(tmp_path):
    with pytest.raises(DataError, match=r"a.csv: no label column 'label'; the columns are \['text', 'y'\]"):
        load_text(_csv(tmp_path / "a.csv", [("x", 1)], header=("text", "y")))
    with pytest.raises(DataError, match=r"c.csv: no text column: the columns are \['body', 'label'\]"):
        load_text(_csv(tmp_path / "c.csv", [("x", 1)], header=("body", "label")))
    with pytest.raises(DataError, match="b.csv: the dataset is empty"):
        load_text(_csv(tmp_path / "b.csv", []))


@pytest.mark.parametrize("example,match", [
    ({"target_scores": {"a": 1, "b": 0}}, r"examples\[1\]: missing 'input'"),
    ({"input": "q"}, r"examples\[1\]: missing 'target_scores'"),
    ({"input": "q", "target_scores": {"a": 1}}, r"examples\[1\]: a multiple-choice example needs at least 2 choices"),
    ({"input": "q", "target_scores": {"a": 1, " ": 0}}, r"examples\[1\]: every choice must be a non-empty string"),
])
def test_bad_bigbench_rows_are_named(tmp_path, example, match):
    good = {"input": "fine", "target_scores": {"a": 1, "b": 0}}
    with pytest.raises(DataError, match=match):
        load_mc(_json(tmp_path / "task.json", {"examples": [good, example]}))


@pytest.mark.parametrize("change,match", [
    ({"answer": None}, r"\[1\]: missing 'answer'"),
    ({"instruction": "no format line"}, r"\[1\]: no choices"),
    ({"instruction": "Answer format: true"}, r"\[1\]: a multiple-choice example needs at least 2 choices"),
    ({"answer": "maybe", "output": "the correct answer is maybe"}, r"\[1\]: answer 'maybe' is not one of the choices"),
    ({"output": "true, it is"}, r"\[1\]: output 'true, it is' does not end with the answer"),
])
def test_bad_llm_adapters_rows_are_named(tmp_path, change, match):
    with pytest.raises(DataError, match=match):
        load_mc(_json(tmp_path / "c.json", [BOOLQ, {**BOOLQ, **change}]))


def test_eval_label_not_seen_in_training_names_the_row(tmp_path):
    tok = word_tokenizer(["good bad film"], "bert")
    train = load_text(_csv(tmp_path / "train.csv", [("good film", "pos"), ("bad film", "neg")]))
    eval_ = load_text(_csv(tmp_path / "eval.csv", [("good", "pos"), ("film", "neutral")]))
    with pytest.raises(DataError, match="eval.csv line 3: label 'neutral' does not occur in the training data "
                                        r"\(training labels: neg, pos\)"):
        prepare_classification(tok, train, eval_, max_length=16)


def test_pad_token_fallback_is_set_and_reported():
    tok = word_tokenizer(["a b"], "llama", pad=False)
    assert tok.pad_token is None
    note = ensure_pad_token(tok)
    assert tok.pad_token == "[SEP]" and "no pad token" in note and "eos token '[SEP]'" in note
    assert ensure_pad_token(tok) is None
    bare = word_tokenizer(["a b"], "llama", pad=False)
    bare.eos_token = None
    bare.unk_token = None
    with pytest.raises(DataError, match="no pad, eos or unk token"):
        ensure_pad_token(bare)
