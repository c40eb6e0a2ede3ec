"""Classification: GLUE metrics against hand-computed values, the label space, the head, truncation counts."""

import math

import pytest
import torch

from tsd_text import classification as cls
from tsd_text.data import DataError, TextExample
from tsd_text.tiny import tiny_model, word_tokenizer

T = torch.tensor


def test_binary_metrics_by_hand():
    ref = T([1, 1, 1, 0, 0, 0, 1, 0])
    pred = T([1, 0, 1, 0, 1, 0, 1, 1])  # tp 3, fn 1, fp 2, tn 2
    m = cls.compute_metrics({"pred": pred, "ref": ref}, {"labels": ["0", "1"], "regression": False})
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["matthews_correlation"] == pytest.approx((3 * 2 - 2 * 1) / math.sqrt(5 * 4 * 4 * 3))


def test_multiclass_metrics_by_hand():
    ref, pred = T([0, 0, 1, 1, 2, 2]), T([0, 1, 1, 1, 2, 0])
    C = cls.confusion(pred, ref, 3)
    assert C.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # s = 6, c = 4, t = (2, 2, 2), p = (2, 3, 1): (4*6 - 12) / sqrt((36 - 14) (36 - 12))
    assert cls.matthews_corrcoef(C) == pytest.approx(12 / math.sqrt(22 * 24))
    assert cls.f1_score(C) == pytest.approx((2 / 4 + 4 / 5 + 2 / 3) / 3)  # macro over (0.5, 0.8, 2/3)
    assert cls.matthews_corrcoef(cls.confusion(T([0, 0, 0]), T([0, 1, 2]), 3)) == 0.0  # constant prediction


def test_pearson_and_spearman_with_ties_by_hand():
    assert cls.average_ranks(T([10.0, 20, 20, 20, 5])).tolist() == [2, 4, 4, 4, 1]
    x, y = T([1.0, 2, 2, 3]), T([1.0, 3, 2, 10])
    assert cls.pearson(x, y) == pytest.approx(9 / math.sqrt(2 * 50))  # dx (-1,0,0,1), dy (-3,-1,-2,6)
    # ranks x (1, 2.5, 2.5, 4), y (1, 3, 2, 4): Σ dxdy = 4.5, Σ dx² = 4.5, Σ dy² = 5
    assert cls.spearman(x, y) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    m = cls.compute_metrics({"pred": x, "ref": y}, {"labels": None, "regression": True})
    assert m == pytest.approx({"pearson": 0.9, "spearman": 4.5 / math.sqrt(22.5)})


def _ex(label, i=0):
    return TextExample("good film", None, label, f"f.csv line {i + 2}")


def test_label_space_classes_regression_and_unseen_labels():
    space = cls.LabelSpace.from_examples([_ex("10"), _ex("2"), _ex(1.0), _ex("1")])
    assert space.names == ("1", "2", "10") and not space.regression  # numeric order; 1, 1.0, "1" are one class
    assert [space.encode(_ex(v)) for v in ("2", 10, "1.0")] == [1, 2, 0]
    assert cls.LabelSpace.from_examples([_ex("pos"), _ex("neg")]).names == ("neg", "pos")
    reg = cls.LabelSpace.from_examples([_ex("0.5"), _ex("3"), _ex(4.2)])
    assert reg.regression and reg.encode(_ex("2.25")) == 2.25
    with pytest.raises(DataError, match="f.csv line 9: label 'high' is not a number"):
        reg.encode(_ex("high", 7))
    with pytest.raises(DataError, match="f.csv line 5: label '3' does not occur in the training data"):
        space.encode(_ex("3", 3))
    with pytest.raises(DataError, match=r"label -1 does not occur .*test splits mark unlabelled rows with -1"):
        space.encode(_ex(-1, 3))


def test_head_modules_are_detected_generically():
    assert cls.head_modules(tiny_model("bert", 50), []) == ["classifier"]
    assert cls.head_modules(tiny_model("deberta", 50), []) == ["classifier", "pooler"]
    # weights the checkpoint lacked (a sentence-embedding checkpoint without a pooler) are trained too
    missing = ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight"]
    assert cls.head_modules(tiny_model("bert", 50), missing) == ["bert.pooler.dense", "classifier"]


def test_prepare_counts_truncations_and_checks_pairs():
    tok = word_tokenizer(["a b c d e f g h"], "bert")
    train = [TextExample("a b c d e f g h", None, 1, "t line 2"), TextExample("a b", None, 0, "t line 3")]
    data = cls.prepare(tok, train, train[:1], max_length=6)
    assert data.truncated == {"train": 1, "eval": 1}
    assert [len(i["input_ids"]) for i in data.train] == [6, 4] and data.train[0]["labels"] == 1
    batch = data.collate_train(data.train)
    assert batch["input_ids"].shape == (2, 6) and batch["labels"].tolist() == [1, 0]
    with pytest.raises(DataError, match="e line 2: the training data has no text_pair"):
        cls.prepare(tok, train, [TextExample("a", "b", 1, "e line 2")], max_length=6)
