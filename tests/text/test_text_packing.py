"""--packing: best-fit-decreasing bins, one row per batch with position ids restarting per document, and no attention
across documents: a tiny LLaMA's output at every position equals the document's own output, and a packed batch's
loss and gradients equal the padded batch's; a packed run trains, and packing a classifier is refused."""

import json

import pytest
import torch

import shared
from tests.helpers import LLAMA_TARGETS, tiny_llama
from tsd_text import causal
from tsd_text.data import IGNORE_INDEX
from tsd_text.packing import collate_packed, pack
from tsd_text.tiny import write_toy_classification, write_toy_mc
from tsd_text.train import main, parse_args


def _rows(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(1, 128, (n,), generator=g).tolist()
        k = n // 2  # a prompt, then an answer
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * k + ids[k:]})
    return rows


def test_best_fit_decreasing_bins():
    rows = _rows([6, 5, 4, 3, 3, 2, 1])
    bins = pack(rows, capacity=8)
    assert [[len(r["input_ids"]) for r in b] for b in bins] == [[6, 2], [5, 3], [4, 3, 1]]
    assert sorted(id(r) for b in bins for r in b) == sorted(id(r) for r in rows)  # every row once
    with pytest.raises(ValueError, match="a row of 9 tokens does not fit bins of 8"):
        pack(_rows([9]), 8)


def test_a_packed_batch_is_one_row_with_positions_and_first_labels_reset():
    rows = _rows([3, 4, 2])
    batch = collate_packed([rows[:2], rows[2:]])
    # no attention mask and no cache: transformers then builds the block-diagonal mask from the positions
    assert set(batch) == {"input_ids", "position_ids", "labels", "use_cache"} and batch["use_cache"] is False
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert batch["input_ids"][0].tolist() == [t for r in rows for t in r["input_ids"]]
    assert batch["labels"][0].tolist() == [t for r in rows for t in [IGNORE_INDEX, *r["labels"][1:]]]


@torch.no_grad()
def test_packed_outputs_equal_each_documents_own_outputs():
    model = tiny_llama(seed=3)
    rows = _rows([7, 3, 11, 5], seed=1)
    packed = collate_packed([rows])
    logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits[0]
    start = 0
    for r in rows:
        alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
        torch.testing.assert_close(logits[start:start + len(r["input_ids"])], alone, atol=1e-5, rtol=1e-5)
        start += len(r["input_ids"])
    # the controls: without the position reset, or with a key/value cache (LLaMA's default, even in training),
    # the second document attends to the first, and its outputs differ
    no_reset = model(input_ids=packed["input_ids"], position_ids=torch.arange(start)[None], use_cache=False)
    with_cache = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"])
    for leaky in (no_reset.logits[0], with_cache.logits[0]):
        assert (leaky[7:10] - logits[7:10]).abs().max() > 1e-2


def test_packed_loss_and_gradients_equal_the_padded_batchs():
    rows = _rows([7, 3, 11, 5], seed=2)
    grads = {}
    for name, batch in [("padded", causal.pad_rows(rows, pad_id=0)), ("packed", collate_packed([rows[:2], rows[2:]]))]:
        # PiSSA: both factors non-zero, so A and B both get gradients
        config = shared.AdapterConfig(method="pissa", r=4, target_modules=LLAMA_TARGETS)
        adapter = shared.attach(tiny_llama(seed=4), config)
        loss = adapter.model(**batch).loss
        loss.backward()
        grads[name] = (loss.detach(), [p.grad.clone() for p in adapter.trainable_parameters()])
    torch.testing.assert_close(grads["packed"][0], grads["padded"][0], atol=1e-6, rtol=1e-6)
    for a, b in zip(grads["packed"][1], grads["padded"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_packed_run_trains_and_a_packed_classifier_is_refused(tmp_path, capsys):
    task, model = write_toy_mc(tmp_path / "mc", 30)
    out = tmp_path / "out"
    result = main(parse_args(["--model_name_or_path", str(model), "--task", "causal-mc", "--train_file", str(task),
                              "--eval_split", "6", "--packing", "--max_length", "64", "--method", "dash",
                              "--dash_warmup_steps", "2", "--target_modules", "q_proj,v_proj", "--max_steps", "4",
                              "--per_device_train_batch_size", "2", "--no-report_plot", "--output_dir", str(out)]))
    packing = json.loads((out / "training_args.json").read_text())["resolved"]["packing"]
    assert packing["rows"] == 24 and packing["bins"] < 24 and 0 < packing["fill"] <= 1
    assert result.adapter.switched and result.results["train"]["steps"] == 4
    assert result.results["train"]["tokens"] > 0
    train, evals, classifier = write_toy_classification(tmp_path / "cls", kind="bert")
    with pytest.raises(SystemExit):
        parse_args(["--model_name_or_path", str(classifier), "--task", "classification", "--train_file", str(train),
                    "--eval_file", str(evals), "--packing", "--output_dir", str(out)])
    assert "--packing: for --task causal-mc only (a classifier reads each example on its own" in capsys.readouterr().err
