"""Input files of the text trainer: format detection, reading, validation with row names, prompt text.

Formats are detected from the content (the suffix only decides CSV/TSV):

- ``bigbench``: a BIG-bench task JSON, ``{"examples": [{"input": str, "target_scores": {choice: score}}], ...}``.
  The answer is the choice of highest score. The prompt follows BIG-bench's own zero-shot formatting and honours
  the task's ``task_prefix``, ``example_input_prefix`` (default ``"\\nQ: "``), ``choice_prefix``
  (``"\\n  choice: "``), ``append_choices_to_input`` (default true) and ``example_output_prefix`` (``"\\nA: "``).
- ``llm-adapters``: the LLM-Adapters commonsense JSON (Hu et al. 2023; the data of the LoRA-Dash paper's commonsense
  experiments), a list of ``{"instruction", "input", "output", "answer"}`` in the Alpaca template. The choices come
  from a ``choices`` list when there is one, else from the instruction's ``Answer format: a/b/c`` line (every row of
  commonsense_170k and of the eight test sets has one). ``output`` must end with ``answer``
  (``"the correct answer is true"``); what precedes the answer becomes part of the context.
- ``choices``: JSON lines or a JSON list of ``{"question": str, "choices": [str, ...], "answer": ...}`` (the
  question may also be ``input`` or ``question_stem``; ``choices`` may be ``{"text": [...], "label": [...]}``
  as ARC and OpenBookQA export it; ``answer`` or ``answerKey`` is a 0-based index, a choice's text or a choice's
  label). The prompt template (``template``, the trainer's ``--prompt_template``) is ``question``, the default:
  ``"Question: {question}\nAnswer: "`` continued by each choice's text; or ``llm-adapters``: the instruction
  LLM-Adapters wrote for the task (:data:`LLM_ADAPTERS_WORDING`, by the task's name; the choices listed and named
  ``answer1``, ``solution1``, ``ending1``, ``option1`` or ``true``/``false``) in the Alpaca template, continued by
  ``"the correct answer is "`` and the choice's name: the format of their commonsense_170k data, which the LoRA-Dash
  paper trains on and evaluates by generation.
- ``alpaca``: instruction data for training only, ``{"instruction", "input", "output"}`` without an ``answer``: the
  Alpaca prompt, then the output (:class:`Completion`).
- ``chat``: conversations for training only, ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered by the
  tokenizer's chat template (:class:`Chat`; ``tsd_text.chat``).
- ``table``: CSV/TSV with a header, JSON lines, a JSON list of objects, or Parquet, with a ``label`` and one or two text
  columns (classification): ``text`` [, ``text_pair``], or GLUE's names as ``datasets`` exports them
  (``sentence``, ``sentence1``/``sentence2``, ``question``/``sentence``, ``question1``/``question2``,
  ``premise``/``hypothesis``), or any columns named by ``text_columns`` and ``label_column``.

Every format but the BIG-bench JSON may also come as a ``.parquet`` file of records (what the Hugging Face Hub serves
for ``datasets``; read with pyarrow), whose columns are the record's keys.

Every error names the file and the row: ``train.csv line 7`` (physical line, header = line 1), ``x.jsonl line 3``,
``task.json examples[12]``, ``train.parquet row 4`` (0-based, as ``datasets`` indexes).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import InputError, MissingInputError

MC_FORMATS = ("bigbench", "llm-adapters", "choices")
#: formats that train a causal LM but have no choices to evaluate
TRAIN_ONLY_FORMATS = ("alpaca", "chat")
PROMPT_TEMPLATES = ("question", "llm-adapters")
#: the question field of a ``choices`` record, tried in order (ARC/CSQA, BIG-bench style, OpenBookQA)
QUESTION_KEYS = ("question", "input", "question_stem")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
IGNORE_INDEX = -100  # the label the loss skips (torch's cross-entropy default)
ALPACA = ("Below is an instruction that describes a task{paired}. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")
ANSWER_FORMAT = re.compile(r"answer format:\s*([^\n]+)", re.IGNORECASE)
#: LLM-Adapters' instruction per commonsense task (Hu et al. 2023, EMNLP; their commonsense_170k data) and how it
#: names choice k (``{k}`` from 1); every other task gets the last entry's. BoolQ's choices are named true/false.
LLM_ADAPTERS_WORDING = {
    "boolq": ("Please answer the following question with true or false, question: {question}", None),
    "piqa": ("Please choose the correct solution to the question: {question}", "Solution{k}"),
    "hellaswag": ("Please choose the correct ending to complete the given sentence: {question}", "Ending{k}"),
    "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: {question}",
                   "Option{k}"),
    "*": ("Please choose the correct answer to the question: {question}", "Answer{k}"),
}
LLM_ADAPTERS_LEAD = "the correct answer is "
BOOLQ_NAMES = {"yes": "true", "no": "false", "true": "true", "false": "false"}


class DataError(InputError):
    """An input file that cannot be used; the message names the file and, where it applies, the row."""


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice item: the model sees ``context`` and should continue with ``choices[label]``.

    ``task`` names the source it came from (per-task metrics); ``prompt`` is what generation starts from
    (``--eval_mode generate``; None: the context without its trailing whitespace).
    """

    context: str
    choices: tuple[str, ...]
    label: int
    where: str
    task: str = ""
    prompt: str | None = None

    @property
    def generation_prompt(self) -> str:
        return self.prompt if self.prompt is not None else self.context.rstrip()


@dataclass(frozen=True)
class Completion:
    """An instruction record to train on: the model learns ``completion`` after ``prompt``."""

    prompt: str
    completion: str
    where: str
    task: str = ""


@dataclass(frozen=True)
class Chat:
    """A conversation to train on: ``(role, content)`` turns, the loss on the assistant's."""

    messages: tuple[tuple[str, str], ...]
    where: str
    task: str = ""


@dataclass(frozen=True)
class TextExample:
    """One classification/regression item; ``label`` is the raw value from the file (str, int or float)."""

    text: str
    text_pair: str | None
    label: Any
    where: str
    task: str = ""


@dataclass
class TaskData:
    """Tokenised data of one task, ready for ``DataLoader`` (items are dicts of lists).

    ``predict(model, batch)`` gives a dict of per-example tensors (``pred``, ``ref``, ...) that the task's
    ``compute_metrics(columns, info)`` turns into metrics. ``packed`` (``--packing``) holds the training rows grouped
    into bins, which ``collate_packed`` joins into one row; ``train`` keeps the rows one by one (the data-driven
    inits count samples).
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    collate_train: Callable[[list[dict[str, Any]]], dict[str, Any]]
    collate_eval: Callable[[list[dict[str, Any]]], dict[str, Any]]
    truncated: dict[str, int]
    predict: Callable[[Any, dict[str, Any]], dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    packed: list[list[dict[str, Any]]] | None = None
    collate_packed: Callable[[list[list[dict[str, Any]]]], dict[str, Any]] | None = None


# ---------------------------------------------------------------------------------------------------------- reading
@dataclass
class Records:
    format: str  # bigbench | llm-adapters | choices | alpaca | chat | table
    rows: list[tuple[str, dict[str, Any]]]  # (where, fields)
    meta: dict[str, Any]


#: text columns of a classification table, tried in this order: ours, then GLUE's (as ``run_glue.py``'s task_to_keys)
TEXT_COLUMNS: tuple[tuple[str, ...], ...] = (("text", "text_pair"), ("sentence1", "sentence2"),
                                             ("question", "sentence"),
                                             ("question1", "question2"), ("premise", "hypothesis"), ("text",),
                                             ("sentence",))


def read_records(path: str | Path, table_keys: Sequence[str] = ()) -> Records:
    """Read ``path`` and detect its format; raise :class:`DataError` for anything unrecognised.

    A JSON record is a table row when it has a ``label``, one of the :data:`TEXT_COLUMNS` sets, or a key of
    ``table_keys`` (the columns a caller asks for).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"data file not found: {path}")
    if path.suffix.lower() in TABLE_SUFFIXES:
        return Records("table", _read_csv(path, TABLE_SUFFIXES[path.suffix.lower()]), {})
    if path.suffix.lower() == ".parquet":
        return _detect_records(path, _read_parquet(path), table_keys)
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        obj = json.loads(text)
        rows = None
    except json.JSONDecodeError:
        obj, rows = None, _read_jsonl(path, text)
    if isinstance(obj, dict) and isinstance(obj.get("examples"), list):
        meta = {k: v for k, v in obj.items() if k != "examples"}
        return Records("bigbench", [(f"{path.name} examples[{i}]", e) for i, e in enumerate(obj["examples"])], meta)
    if isinstance(obj, dict):  # one record: a JSON-lines file of one line
        rows = [(f"{path.name} line 1", obj)]
    elif isinstance(obj, list):
        rows = [(f"{path.name} [{i}]", e) for i, e in enumerate(obj)]
    if rows is None or not all(isinstance(r, dict) for _, r in rows):
        shape = "not JSON" if rows is None and obj is None else f"a JSON {type(obj).__name__}"
        raise DataError(f"{path}: unknown format ({shape}). Expected a BIG-bench task JSON ({{'examples': [...]}}), "
                        "the LLM-Adapters JSON (a list of {instruction, input, output, answer}), CSV/TSV, or "
                        "JSON lines with text/label")
    return _detect_records(path, rows, table_keys)


def _detect_records(path: Path, rows: list[tuple[str, dict[str, Any]]], table_keys: Sequence[str]) -> Records:
    """The format of a list of records, from the keys of the first."""
    if not rows:
        raise DataError(f"{path}: the dataset is empty (no records)")
    first = rows[0][1]
    tabular = "label" in first or any(k in first for k in table_keys) or any(
        all(k in first for k in cols) for cols in TEXT_COLUMNS)
    fmt = ("chat" if "messages" in first else ("llm-adapters" if "answer" in first else "alpaca")
           if "instruction" in first else "choices" if "choices" in first
           and any(k in first for k in QUESTION_KEYS) else "table" if tabular else None)
    if fmt is None:
        raise DataError(f"{path}: unknown format: the first record has keys {sorted(first)}; expected a BIG-bench "
                        "task ('examples'), instruction/input/output/answer (LLM-Adapters), instruction/input/output "
                        "(Alpaca), messages (chat) or text/label")
    return Records(fmt, rows, {})


def _read_csv(path: Path, delimiter: str) -> list[tuple[str, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = [(f"{path.name} line {reader.line_num}", row) for row in reader]
        if not reader.fieldnames:
            raise DataError(f"{path}: the file is empty (no header)")
        return rows


def _read_parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as err:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow (or tsd-lora[text])") from err
    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err
    return [(f"{path.name} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_jsonl(path: Path, text: str) -> list[tuple[str, dict[str, Any]]] | None:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path.name} line {n}", json.loads(line)))
        except json.JSONDecodeError as err:
            if not rows:
                return None  # neither JSON nor JSON lines
            raise DataError(f"{path} line {n}: not valid JSON ({err.msg})") from err
    return rows


def _field(where: str, row: dict[str, Any], name: str, kind: type = str) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: missing '{name}' "
                        f"(fields present: {sorted(k for k in row if row[k] not in (None, ''))})")
    if not isinstance(value, kind):
        raise DataError(f"{where}: '{name}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _nonempty(path: str | Path, items: list) -> list:
    if not items:
        raise DataError(f"{path}: the dataset is empty (no examples)")
    return items


# ---------------------------------------------------------------------------------------------- multiple choice
def load_mc(path: str | Path, template: str = "question", task: str = "") -> list[MCExample]:
    """Multiple-choice examples of a BIG-bench, LLM-Adapters or question/choices file, of the task ``task``;
    ``template`` prompts question/choices records (module docstring). Instruction and chat records, which have no
    choices, are refused: they cannot be evaluated as multiple choice."""
    rec = read_records(path)
    if rec.format in TRAIN_ONLY_FORMATS:
        raise DataError(f"{path}: {rec.format} records have no choices, so they cannot be scored as multiple "
                        "choice; evaluate --task causal-mc on a BIG-bench task JSON, the LLM-Adapters JSON or "
                        "question/choices/answer records (instruction and chat records can be trained on)")
    return _mc_examples(path, rec, template, task)


def load_causal(path: str | Path, template: str = "question", task: str = "") -> list[MCExample | Completion | Chat]:
    """What a causal LM can train on: the examples of :func:`load_mc`, Alpaca records (:class:`Completion`) or
    conversations (:class:`Chat`)."""
    rec = read_records(path)
    if rec.format == "alpaca":
        return _nonempty(path, [_alpaca_example(where, row, task) for where, row in rec.rows])
    if rec.format == "chat":
        return _nonempty(path, [_chat_example(where, row, task) for where, row in rec.rows])
    return _mc_examples(path, rec, template, task)


def _mc_examples(path: str | Path, rec: Records, template: str, task: str) -> list[MCExample]:
    if rec.format not in MC_FORMATS:
        raise DataError(f"{path}: task causal-mc needs a BIG-bench task JSON, the LLM-Adapters JSON or "
                        "question/choices/answer records (or, to train on, Alpaca or chat records); "
                        f"this is a {rec.format} file (text/label rows are for --task classification)")
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose one of {', '.join(PROMPT_TEMPLATES)}")
    parse = {"bigbench": _bigbench_example, "llm-adapters": _llm_adapters_example,
             "choices": functools.partial(_choices_example, template=template, task=task)}[rec.format]
    return _nonempty(path, [dataclasses.replace(parse(where, row, rec.meta), task=task) for where, row in rec.rows])


def _alpaca_example(where: str, row: dict[str, Any], task: str) -> Completion:
    return Completion(alpaca_prompt(_field(where, row, "instruction"), str(row.get("input") or "")),
                      _field(where, row, "output"), where, task)


def _chat_example(where: str, row: dict[str, Any], task: str) -> Chat:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{'role': str, 'content': str}}, got {m!r}")
        turns.append((m["role"], m["content"]))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: no assistant turn, so nothing to train on (the loss falls on assistant turns "
                        "only)")
    return Chat(tuple(turns), where, task)


def _choices(where: str, choices: Sequence[str]) -> tuple[str, ...]:
    if len(choices) < 2:
        raise DataError(f"{where}: a multiple-choice example needs at least 2 choices, got {list(choices)}")
    if any(not isinstance(c, str) or not c.strip() for c in choices):
        raise DataError(f"{where}: every choice must be a non-empty string, got {list(choices)}")
    return tuple(choices)


def _bigbench_example(where: str, row: dict[str, Any], meta: dict[str, Any]) -> MCExample:
    question = _field(where, row, "input")
    scores = _field(where, row, "target_scores", dict)
    choices = _choices(where, list(scores))
    label = max(range(len(choices)), key=lambda i: scores[choices[i]])
    if meta.get("append_choices_to_input", True):
        prefix = meta.get("choice_prefix", "\n  choice: ")
        question = question + prefix + prefix.join(choices)
    context = (meta.get("task_prefix", "") + meta.get("example_input_prefix", "\nQ: ") + question
               + meta.get("example_output_prefix", "\nA: "))
    return MCExample(context.lstrip(), choices, label, where)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca template LLM-Adapters trains and evaluates with (``### Response:`` ends the prompt)."""
    if input.strip():
        return ALPACA.format(paired=", paired with an input that provides further context", instruction=instruction,
                             input_block=f"### Input:\n{input}\n\n")
    return ALPACA.format(paired="", instruction=instruction, input_block="")


def _llm_adapters_example(where: str, row: dict[str, Any], meta: dict[str, Any]) -> MCExample:
    instruction = _field(where, row, "instruction")
    output = _field(where, row, "output")
    answer = _field(where, row, "answer")
    if isinstance(row.get("choices"), list):
        choices = _choices(where, row["choices"])
    else:
        found = ANSWER_FORMAT.findall(instruction)
        if not found:
            raise DataError(f"{where}: no choices: add a 'choices' list or an 'Answer format: a/b' line to the "
                            "instruction")
        choices = _choices(where, [c.strip() for c in found[-1].split("/") if c.strip()])
    lowered = [c.lower() for c in choices]
    if answer.strip().lower() not in lowered:
        raise DataError(f"{where}: answer {answer!r} is not one of the choices {list(choices)}")
    if not output.rstrip().lower().endswith(answer.strip().lower()):
        raise DataError(f"{where}: output {output!r} does not end with the answer {answer!r}; causal-mc scores "
                        "each choice as the continuation of the output's text before the answer")
    lead = output.rstrip()[: len(output.rstrip()) - len(answer.strip())]
    prompt = alpaca_prompt(instruction, str(row.get("input") or ""))
    return MCExample(prompt + lead, choices, lowered.index(answer.strip().lower()), where, prompt=prompt)


def llm_adapters_instruction(task: str, question: str, choices: Sequence[str], where: str) -> tuple[str, list[str]]:
    """LLM-Adapters' instruction for a question/choices item of ``task`` and the names of its choices: the task's
    wording (:data:`LLM_ADAPTERS_WORDING`), each choice on its own line as ``Answer1: ...``, and the
    ``Answer format: answer1/answer2`` line; BoolQ lists no choices and names yes/no true/false."""
    wording, name = LLM_ADAPTERS_WORDING.get(task, LLM_ADAPTERS_WORDING["*"])
    if name is None:
        names = [BOOLQ_NAMES.get(c.strip().lower()) for c in choices]
        if None in names or len(set(names)) != len(names):
            raise DataError(f"{where}: {task} is asked as true/false, so its choices must be yes/no or true/false, "
                            f"got {list(choices)}")
        listed = ""
    else:
        names = [name.format(k=k).lower() for k in range(1, len(choices) + 1)]
        listed = "".join(f"\n\n{name.format(k=k)}: {c}" for k, c in enumerate(choices, 1))
    return wording.format(question=question) + listed + f"\n\nAnswer format: {'/'.join(names)}", names


def _choices_example(where: str, row: dict[str, Any], meta: dict[str, Any], template: str = "question",
                     task: str = "") -> MCExample:
    question = _field(where, row, next(k for k in QUESTION_KEYS if k in row))
    raw = row.get("choices")
    labels: list[str] = []
    if isinstance(raw, dict):  # ARC / OpenBookQA: {"text": [...], "label": ["A", "B", ...]}
        labels = [str(x) for x in raw.get("label") or []]
        raw = raw.get("text")
    if not isinstance(raw, list):
        raise DataError(f"{where}: 'choices' must be a list of strings or {{'text': [...], 'label': [...]}}")
    choices = _choices(where, raw)
    key = "answer" if "answer" in row else "answerKey"
    answer = row.get(key)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        index = answer
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    elif isinstance(answer, str) and answer in labels:
        index = labels.index(answer)
    else:
        raise DataError(f"{where}: '{key}' {answer!r} is neither a 0-based index below {len(choices)} nor one of "
                        f"the choices {list(choices)}" + (f" or their labels {labels}" if labels else ""))
    if template == "llm-adapters":
        instruction, names = llm_adapters_instruction(task, question, choices, where)
        prompt = alpaca_prompt(instruction)
        return MCExample(prompt + LLM_ADAPTERS_LEAD, tuple(names), index, where, prompt=prompt)
    return MCExample(f"Question: {question}\nAnswer: ", choices, index, where)


# ------------------------------------------------------------------------------------------------ classification
def load_text(path: str | Path, text_columns: Sequence[str] | None = None,
              label_column: str = "label") -> list[TextExample]:
    """Classification/regression rows (one or two text columns and a label) of a CSV/TSV/JSONL/JSON/Parquet file.

    Without ``text_columns`` the first of :data:`TEXT_COLUMNS` that the first row has is used (``text_pair``
    only when the first row fills it); other columns (GLUE's ``idx``) are ignored.
    """
    rec = read_records(path, table_keys=[label_column, *(text_columns or [])])
    if rec.format != "table":
        raise DataError(f"{path}: task classification needs CSV/TSV, JSON lines or Parquet with text/label; this is a "
                        f"{rec.format} file (use --task causal-mc)")
    if not rec.rows:
        return _nonempty(path, [])
    first = rec.rows[0][1]
    keys = _text_columns(path, first, text_columns)
    if label_column not in first:
        raise DataError(f"{path}: no label column {label_column!r}; the columns are {list(first)} "
                        "(name another with --label_column_name)")
    out: list[TextExample] = []
    for where, row in rec.rows:
        label = row.get(label_column)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{where}: missing '{label_column}'")
        texts = [_field(where, row, k) for k in keys]
        out.append(TextExample(texts[0], texts[1] if len(texts) > 1 else None, label, where))
    return _nonempty(path, out)


def _text_columns(path: str | Path, first: dict[str, Any], given: Sequence[str] | None) -> tuple[str, ...]:
    if given:
        missing = [k for k in given if k not in first]
        if missing or not 1 <= len(given) <= 2:
            raise DataError(f"{path}: --text_column_names {','.join(given)} must name one or two of the columns "
                            f"{list(first)}")
        return tuple(given)
    for cols in TEXT_COLUMNS:  # a pair only when the first row fills its second column (text_pair may be blank)
        if cols[0] in first and all(first.get(k) not in (None, "") for k in cols[1:]):
            return cols
    raise DataError(f"{path}: no text column: the columns are {list(first)}; expected text [, text_pair], one of "
                    "GLUE's (sentence, sentence1/sentence2, question/sentence, question1/question2, "
                    "premise/hypothesis) or --text_column_names")


# ---------------------------------------------------------------------------------------------------- splitting
def train_eval_split(examples: list, eval_split: float, seed: int, path: str | Path) -> tuple[list, list]:
    """Shuffle with ``seed`` and hold out ``eval_split`` (a fraction < 1, or a count >= 1) for evaluation."""
    n_eval = round(eval_split * len(examples)) if eval_split < 1 else int(eval_split)
    if not 0 < n_eval < len(examples):
        raise DataError(f"{path}: --eval_split {eval_split} leaves {n_eval} of {len(examples)} examples for "
                        "evaluation; it must leave at least one for each of train and eval")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


# ------------------------------------------------------------------------------------------------------ tokenizer
def ensure_pad_token(tokenizer: Any) -> str | None:
    """Give a tokenizer without a pad token one (eos, else unk); return a note saying so, or None."""
    if tokenizer.pad_token is not None:
        return None
    for name in ("eos_token", "unk_token"):
        token = getattr(tokenizer, name)
        if token is not None:
            tokenizer.pad_token = token
            return (f"the tokenizer has no pad token; using its {name.split('_')[0]} token {token!r} for padding "
                    "(padded positions are masked out of attention and loss)")
    raise DataError("the tokenizer has no pad, eos or unk token to pad with; add a pad token to it")
