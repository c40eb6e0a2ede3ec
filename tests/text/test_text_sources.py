"""Several --train_file / --eval_file values and named mixtures: task names, the caps shared among tasks (every task
represented, seeded), and the mistakes refused with the flag and the reason."""

import json

import pytest

from shared.errors import InputError
from tsd_common.assets import asset_path
from tsd_text.data import load_mc, load_text, train_eval_split
from tsd_text.sources import MIXTURES, Source, quotas, resolve, subsample, task_name
from tsd_text.train import TextTrainConfig, load_examples, parse_args


def _mc_file(path, n, tag):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps({"question": f"{tag} {i}?", "choices": ["a", "b"], "answer": i % 2})
                              for i in range(n)))
    return path


def test_quotas_share_the_cap_evenly_and_pass_a_small_tasks_rest_on():
    assert quotas([100, 100, 100], 30) == [10, 10, 10]
    assert quotas([100, 100, 100], 32) == [11, 11, 10]  # the remainder to the first tasks
    assert quotas([3, 100, 100], 30) == [3, 14, 13]  # the small task gives all it has, the rest is shared
    assert quotas([3, 5, 100], 30) == [3, 5, 22]
    assert quotas([3, 5, 100], 500) == [3, 5, 100]
    assert quotas([5, 5, 5, 5], 2) == [1, 1, 0, 0]
    for sizes, total in [([7, 1, 40, 12], 25), ([2, 2], 3), ([10] * 8, 79)]:
        got = quotas(sizes, total)
        assert sum(got) == min(total, sum(sizes)) and all(0 <= g <= s for g, s in zip(got, sizes, strict=True))
        # even: a task cut below its size gets no less than any other task's share, minus the remainder's one
        assert all(g >= max(got) - 1 for g, s in zip(got, sizes, strict=True) if g < s)


def test_subsample_keeps_one_tasks_first_rows_and_draws_every_tasks_share(tmp_path):
    a = load_mc(_mc_file(tmp_path / "a.jsonl", 50, "a"), task="a")
    b = load_mc(_mc_file(tmp_path / "b.jsonl", 9, "b"), task="b")
    assert subsample(a, 7, seed=0) == a[:7]  # one task: the first N, as before mixtures existed
    assert subsample(a + b, None, seed=0) == a + b and subsample(a + b, 100, seed=0) == a + b
    mixed = subsample(a + b, 20, seed=0)
    assert [e.task for e in mixed] == ["a"] * 11 + ["b"] * 9  # b gives all 9, a gets the other 11
    picked = [a.index(e) for e in mixed[:11]]
    assert picked == sorted(picked) and picked != list(range(11))  # a seeded sample, in file order
    assert subsample(a + b, 20, seed=0) == mixed and subsample(a + b, 20, seed=1) != mixed


def test_task_names_come_from_the_file_or_its_directory(tmp_path):
    assert task_name(tmp_path / "boolq.json") == "boolq"
    assert task_name(tmp_path / "boolq" / "test.json") == "boolq"
    assert task_name(tmp_path / "piqa" / "validation.jsonl") == "piqa"
    f = _mc_file(tmp_path / "x" / "train.jsonl", 3, "x")
    assert resolve([str(f), f"mine={f}"], "train", "--train_file") == [Source("x", f), Source("mine", f)]
    with pytest.raises(InputError, match=r"--eval_file: task name\(s\) x given to more than one file; name each"):
        resolve([str(f), str(f)], "eval", "--eval_file")
    with pytest.raises(InputError, match="--train_file 'mine=': expected NAME=PATH"):
        resolve(["mine="], "train", "--train_file")


def test_named_mixtures_read_the_assets_splits_and_refuse_unknown_tasks():
    root = asset_path("commonsense")
    if root is None:
        pytest.skip("the commonsense asset is not fetched (python scripts/fetch_assets.py --only commonsense)")
    tasks = MIXTURES["commonsense"][1]
    assert resolve(["commonsense:all"], "train", "--train_file") == [Source(t, root / t / "train.jsonl")
                                                                     for t in tasks]
    assert resolve(["commonsense:piqa,boolq"], "eval", "--eval_file") == [
        Source("piqa", root / "piqa" / "validation.jsonl"), Source("boolq", root / "boolq" / "validation.jsonl")]
    with pytest.raises(InputError, match=r"--train_file commonsense:piqa,siqa: unknown task\(s\) siqa; commonsense "
                                         r"has boolq, piqa, socialiqa, .* \(or commonsense:all\)"):
        resolve(["commonsense:piqa,siqa"], "train", "--train_file")
    with pytest.raises(InputError, match="a task is named twice"):
        resolve(["commonsense:piqa,piqa"], "train", "--train_file")


def _config(tmp_path, *args):
    return TextTrainConfig.from_args(parse_args(["--model_name_or_path", "m", "--task", "causal-mc",
                                                 "--output_dir", str(tmp_path / "o"), *args]))


def test_several_files_load_per_task_with_shared_caps(tmp_path):
    a, b = _mc_file(tmp_path / "a" / "train.jsonl", 30, "a"), _mc_file(tmp_path / "b.jsonl", 4, "b")
    ea, eb = _mc_file(tmp_path / "a" / "test.jsonl", 12, "ea"), _mc_file(tmp_path / "eb.jsonl", 12, "eb")
    train, eval_ = load_examples(_config(tmp_path, "--train_file", str(a), str(b), "--eval_file", str(ea),
                                         f"b={eb}", "--max_train_samples", "10", "--max_eval_samples", "8"))
    assert [e.task for e in train] == ["a"] * 6 + ["b"] * 4 and [e.task for e in eval_] == ["a"] * 4 + ["b"] * 4
    with pytest.raises(InputError, match="--max_eval_samples 1 is shared among 2 tasks and must leave each at least"):
        load_examples(_config(tmp_path, "--train_file", str(a), "--eval_file", str(ea), str(eb),
                              "--max_eval_samples", "1"))


def test_a_classification_file_keeps_its_first_rows(tmp_path):
    rows = tmp_path / "train.csv"
    rows.write_text("text,label\n" + "".join(f"film {i},{i % 2}\n" for i in range(10)))
    config = TextTrainConfig.from_args(parse_args(["--model_name_or_path", "m", "--task", "classification",
                                                   "--train_file", str(rows), "--eval_split", "4",
                                                   "--max_train_samples", "3", "--max_eval_samples", "2",
                                                   "--output_dir", str(tmp_path / "o")]))
    train, eval_ = load_examples(config)
    all_train, all_eval = train_eval_split(load_text(rows), 4, config.seed, rows)
    assert train == all_train[:3] and eval_ == all_eval[:2]  # one task: the first rows, as before mixtures
