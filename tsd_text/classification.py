"""Sequence classification and regression (BERT, RoBERTa, DeBERTa-v2/v3): labels, tokenising, head, GLUE metrics.

Labels: when every training label is a number and at least one is not an integer, the task is regression
(``num_labels = 1``, MSE); otherwise the distinct training labels are the classes (numbers in numeric order,
strings in lexicographic order). An evaluation label that training never saw is an error.

Metrics (GLUE's): classification reports accuracy, F1 (of class 1 when there are two classes, as GLUE's MRPC/QQP;
macro-averaged over classes otherwise) and Matthews' correlation in its multi-class form (Gorodkin 2004), for a
K × K confusion matrix C with s = Σ C, c = tr C, t = row sums (true), p = column sums (predicted):

    MCC = (c s - Σ_k p_k t_k) / sqrt((s² - Σ_k p_k²) (s² - Σ_k t_k²))          (0 when a factor is 0)

Regression reports Pearson's r and Spearman's ρ = Pearson's r of the ranks, tied values sharing their mean rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import DataError, TaskData, TextExample

TASK_TYPE = "SEQ_CLS"


# ------------------------------------------------------------------------------------------------------- labels
def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class LabelSpace:
    """The classes seen in training (``names``), or regression when ``names`` is None."""

    names: tuple[str, ...] | None

    @property
    def regression(self) -> bool:
        return self.names is None

    @staticmethod
    def key(value: Any) -> str:
        """Class name of a raw label: integral numbers as ints (``1``, ``1.0`` and ``"1"`` are one class)."""
        num = _number(value)
        return str(int(num)) if num is not None and num.is_integer() else str(value).strip()

    @classmethod
    def from_examples(cls, examples: list[TextExample]) -> LabelSpace:
        numbers = [_number(e.label) for e in examples]
        if all(n is not None for n in numbers):
            if any(not n.is_integer() for n in numbers):
                return cls(None)
            return cls(tuple(str(int(n)) for n in sorted(set(numbers))))
        return cls(tuple(sorted({cls.key(e.label) for e in examples})))

    def encode(self, example: TextExample) -> int | float:
        if self.names is None:
            value = _number(example.label)
            if value is None:
                raise DataError(f"{example.where}: label {example.label!r} is not a number (regression task)")
            return value
        key = self.key(example.label)
        if key not in self.names:
            hint = ("; GLUE's test splits mark unlabelled rows with -1, so evaluate on a validation split"
                    if key == "-1" else "")
            raise DataError(f"{example.where}: label {example.label!r} does not occur in the training data "
                            f"(training labels: {', '.join(self.names)}){hint}")
        return self.names.index(key)


# --------------------------------------------------------------------------------------------------- tokenising
def _tokenise(tokenizer: Any, examples: list[TextExample], labels: list[int | float],
              max_length: int) -> tuple[list[dict[str, Any]], int]:
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
    lengths = [len(ids) for ids in tokenizer(texts, pairs)["input_ids"]]
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    items = [{**{k: enc[k][i] for k in enc}, "labels": y} for i, y in enumerate(labels)]
    return items, sum(n > max_length for n in lengths)


def prepare(tokenizer: Any, train: list[TextExample], eval: list[TextExample], max_length: int) -> TaskData:
    """Label space from ``train``; both sets validated (labels, pairing) before tokenising."""
    from transformers import DataCollatorWithPadding

    space = LabelSpace.from_examples(train)
    paired = train[0].text_pair is not None
    for e in eval:
        if (e.text_pair is not None) != paired:
            raise DataError(f"{e.where}: the training data {'has' if paired else 'has no'} text_pair; "
                            "the evaluation data must match")
    y_train, y_eval = [space.encode(e) for e in train], [space.encode(e) for e in eval]
    train_items, cut_train = _tokenise(tokenizer, train, y_train, max_length)
    eval_items, cut_eval = _tokenise(tokenizer, eval, y_eval, max_length)
    collate = DataCollatorWithPadding(tokenizer)
    info = {"labels": list(space.names) if space.names else None, "regression": space.regression}
    return TaskData(train_items, eval_items, collate, collate, {"train": cut_train, "eval": cut_eval}, predict, info)


# -------------------------------------------------------------------------------------------------------- model
def head_modules(model: nn.Module, new_keys: list[str]) -> list[str]:
    """Modules to train in full: the task head (children of the model besides its base model) and every module
    whose weights the checkpoint lacked (``new_keys``: e.g. a pooler a sentence-embedding checkpoint has not)."""
    names = {n for n, child in model.named_children()
             if n != model.base_model_prefix and next(child.parameters(), None) is not None}
    names |= {k.rsplit(".", 1)[0] for k in new_keys}
    return sorted(n for n in names if not any(n.startswith(m + ".") for m in names))


def load_model(path: str, data: TaskData, tokenizer: Any,
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[str]]:
    """The classifier with a head sized for the label space; returns it and its head modules.

    The encoder's weights are in ``dtype``; the head, new and trained in full, stays fp32 (a half-precision
    optimizer step on it would lose small updates).
    """
    from transformers import AutoModelForSequenceClassification

    names = data.info["labels"]
    if names is None:
        kw = {"num_labels": 1, "problem_type": "regression"}
    else:
        kw = {"num_labels": len(names), "id2label": dict(enumerate(names)),
              "label2id": {n: i for i, n in enumerate(names)}, "problem_type": "single_label_classification"}
    model, loading = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **kw)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    new = list(loading.get("missing_keys", ())) + [k[0] if isinstance(k, tuple) else k
                                                  for k in loading.get("mismatched_keys", ())]
    head = head_modules(model, new)
    for name in head:
        model.get_submodule(name).float()
    return model, head


@torch.no_grad()
def predict(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per example: the prediction (the argmax class, or the regression output) and the label."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    pred = logits[:, 0].float() if logits.shape[-1] == 1 else logits.argmax(-1)
    return {"pred": pred, "ref": batch["labels"]}


# ------------------------------------------------------------------------------------------------------ metrics
def confusion(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C[true, predicted] counts (float64)."""
    idx = ref.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).double()


def f1_score(C: torch.Tensor) -> float:
    """F1 of class 1 for two classes, macro F1 otherwise (a class with no support and no prediction scores 0)."""
    tp = C.diagonal()
    denom = C.sum(0) + C.sum(1)  # 2tp + fp + fn
    per_class = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return float(per_class[1]) if C.shape[0] == 2 else float(per_class.mean())


def matthews_corrcoef(C: torch.Tensor) -> float:
    s, c = C.sum(), C.trace()
    t, p = C.sum(1), C.sum(0)
    den = ((s * s - (p * p).sum()) * (s * s - (t * t).sum())).sqrt()
    return float((c * s - (p * t).sum()) / den) if den > 0 else 0.0


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / den) if den > 0 else 0.0


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties sharing their mean rank (scipy's ``rankdata(method="average")``)."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based rank of each distinct value's first occurrence
    return (first + (counts + 1) / 2).double()[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def compute_metrics(columns: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, float]:
    pred, ref = columns["pred"].cpu(), columns["ref"].cpu()
    if info["regression"]:
        return {"pearson": pearson(pred, ref), "spearman": spearman(pred, ref)}
    C = confusion(pred, ref, len(info["labels"]))
    return {"accuracy": float(C.trace() / C.sum()), "f1": f1_score(C), "matthews_correlation": matthews_corrcoef(C)}
