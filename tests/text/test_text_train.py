"""End-to-end runs of the text trainer (main() in-process) on tiny models saved with save_pretrained: outputs,
exact reload in stock peft, every method, errors before training, and the Trainer path choosing the same directions."""

import csv
import dataclasses
import json

import pytest
import torch

import shared
from tests.helpers import NEEDS_CUDA
from tsd_common.assets import asset_path
from tsd_text import causal
from tsd_text.data import ensure_pad_token
from tsd_text.tiny import save_tiny_model, toy_mc_task, word_tokenizer, write_toy_classification, write_toy_mc
from tsd_text.train import (
    TORCH_DTYPES,
    TextTrainConfig,
    adapter_config,
    load_examples,
    main,
    parse_args,
    resolve_targets,
)

LLAMA = "q_proj,k_proj,v_proj,up_proj,down_proj"
QUICK = ["--rank", "4", "--lora_alpha", "8", "--dash_warmup_steps", "3", "--dash_directions", "2",
         "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--seed", "7", "--no-report_plot"]


def _real_tokenizer(asset):
    """The real tokenizer (SmolLM2 / MiniLM) when fetched, else None (a word-level one is built)."""
    from transformers import AutoTokenizer

    path = asset_path(asset)
    return AutoTokenizer.from_pretrained(path) if path else None


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    return write_toy_mc(tmp_path_factory.mktemp("mc"), 30, _real_tokenizer("smollm2"))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_toy_classification(tmp_path_factory.mktemp("cls"), 28, 12, _real_tokenizer("minilm"))


def _run_mc(mc, out, *extra):
    task_file, model_dir = mc
    return main(parse_args(["--model_name_or_path", str(model_dir), "--task", "causal-mc", "--train_file",
                            str(task_file), "--eval_split", "8", "--target_modules", LLAMA, "--output_dir", str(out),
                            *QUICK, *extra]))


def _batch(model_dir, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_pad_token(tok)
    return dict(tok(texts, padding=True, return_tensors="pt"))


@torch.no_grad()
def _assert_stock_peft_reproduces(result, base, batch):
    from peft import PeftModel

    trained = result.adapter.model.eval()
    device = next(trained.parameters()).device  # where accelerate put it
    loaded = PeftModel.from_pretrained(base.eval(), str(result.output_dir)).to(device).eval()
    batch = {k: v.to(device) for k, v in batch.items()}
    diff = (trained(**batch).logits - loaded(**batch).logits).abs().max()
    assert diff <= 1e-4, f"stock PeftModel.from_pretrained differs from the trained model by {diff:.3g}"


def test_causal_mc_dash_end_to_end(mc, tmp_path):
    from transformers import AutoModelForCausalLM

    result = _run_mc(mc, tmp_path / "out", "--max_steps", "6", "--eval_steps", "3", "--report_plot")
    out = result.output_dir
    names = {"adapter_model.safetensors", "adapter_config.json", "eval_results.json", "train_results.json",
             "training_args.json", "loss_log.csv", "tsd_report.csv", "tsd_report.png"}
    assert names <= {p.name for p in out.iterdir()}
    evals = json.loads((out / "eval_results.json").read_text())
    assert evals["before"]["num_examples"] == evals["after"]["num_examples"] == 8
    assert 0 <= evals["after"]["accuracy"] <= 1 and [h["step"] for h in evals["history"]] == [3]
    train = json.loads((out / "train_results.json").read_text())
    assert train["steps"] == 6 and train["dash_switch_step"] == 3 and train["tokens_per_s"] > 0
    args = json.loads((out / "training_args.json").read_text())
    assert args["method"] == "dash" and args["resolved"]["num_examples"] == {"train": 22, "eval": 8}
    assert len(args["resolved"]["target_modules"]) == 2 * 5 and args["resolved"]["modules_to_save"] is None
    log = list(csv.DictReader(open(out / "loss_log.csv")))
    assert [int(r["step"]) for r in log] == list(range(1, 7)) and log[2]["dash_switched"] == "True"
    report = list(csv.DictReader(open(out / "tsd_report.csv")))
    assert len(report) == 10 and {r["layer"] for r in report} == set(args["resolved"]["target_modules"])
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    base = AutoModelForCausalLM.from_pretrained(mc[1], dtype=torch.float32)
    _assert_stock_peft_reproduces(result, base, _batch(mc[1], ["What color is the sky in picture 3?", "blue"]))


def _with_precision(run, *args):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a new precision is a new "process" for accelerate
    try:
        return run(*args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("precision,torch_dtype", [
    ("bf16", "float32"),
    ("bf16", "bfloat16"),
    pytest.param("fp16", "float32", marks=NEEDS_CUDA),
    pytest.param("fp16", "float16", marks=NEEDS_CUDA),
])
def test_mixed_precision_keeps_the_adapter_fp32_and_lambda_learns(mc, tmp_path, precision, torch_dtype):
    """Under autocast (and fp16's grad scaler), over an fp32 or a half-precision frozen base, the adapter stays
    fp32, the switch happens and λ, the parameter group that joins the optimizer at the switch, is stepped."""
    result = _with_precision(_run_mc, mc, tmp_path / precision, "--max_steps", "6", "--mixed_precision", precision,
                             "--torch_dtype", torch_dtype, "--no-eval_before")
    adapter = result.adapter
    assert adapter.switched
    assert {layer.get_base_layer().weight.dtype for layer in adapter.layers.values()} == {TORCH_DTYPES[torch_dtype]}
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in adapter.trainable_parameters())
    assert any(layer.tsd_dash["default"].lam.abs().max() > 0 for layer in adapter.dash_layers.values())
    log = list(csv.DictReader(open(result.output_dir / "loss_log.csv")))
    assert len(log) == 6 and all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in log)


def test_a_half_precision_base_without_autocast_is_refused_before_loading(mc, tmp_path, monkeypatch):
    monkeypatch.setattr(causal, "load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="--torch_dtype bfloat16 .* add --mixed_precision bf16 or fp16"):
        _run_mc(mc, tmp_path, "--torch_dtype", "bfloat16", "--mixed_precision", "no")


def test_classification_over_a_bf16_base_trains_an_fp32_head_and_resumes_exactly(text, tmp_path):
    """The new head stays fp32 over a bf16 encoder, and a resume restores it (and the adapter) bit for bit."""
    from safetensors.torch import load_file

    train_file, eval_file, model_dir = text

    def run(out, *extra):
        return main(parse_args(["--model_name_or_path", str(model_dir), "--task", "classification", "--train_file",
                                str(train_file), "--eval_file", str(eval_file), "--target_modules",
                                "query_proj,value_proj", "--max_steps", "5", "--checkpointing_steps", "2",
                                "--torch_dtype", "bfloat16", "--mixed_precision", "bf16", "--no-eval_before",
                                "--output_dir", str(out), *QUICK, *extra]))

    full = _with_precision(run, tmp_path / "full")
    heads = [p for n, p in full.adapter.model.named_parameters() if "modules_to_save" in n]
    assert heads and all(p.dtype == torch.float32 and p.requires_grad for p in heads)
    assert full.adapter.layers["deberta.encoder.layer.0.attention.self.query_proj"].base_layer.weight.dtype \
        == torch.bfloat16
    resumed = _with_precision(run, tmp_path / "resumed", "--resume_from_checkpoint",
                              str(tmp_path / "full" / "checkpoint-4"))
    want, got = (load_file(r.output_dir / "adapter_model.safetensors") for r in (full, resumed))
    assert got.keys() == want.keys() and any("classifier" in k for k in want)
    for key in want:
        assert want[key].dtype == torch.float32 and torch.equal(got[key], want[key]), key


def test_classification_dash_end_to_end_deberta(text, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train_file, eval_file, model_dir = text
    result = main(parse_args(["--model_name_or_path", str(model_dir), "--task", "classification", "--train_file",
                              str(train_file), "--eval_file", str(eval_file), "--target_modules",
                              "query_proj,value_proj,dense", "--max_steps", "5", "--output_dir", str(tmp_path / "o"),
                              *QUICK]))
    out = result.output_dir
    evals = json.loads((out / "eval_results.json").read_text())
    assert set(evals["after"]) == {"accuracy", "f1", "matthews_correlation", "num_examples"}
    assert evals["after"]["num_examples"] == 12
    resolved = json.loads((out / "training_args.json").read_text())["resolved"]
    assert resolved["modules_to_save"] == ["classifier", "pooler"] and resolved["labels"] == ["0", "1"]
    # "dense" also names pooler.dense: the head is trained in full, not adapted
    assert not any(n.startswith(("pooler", "classifier")) for n in resolved["target_modules"])
    assert json.loads((out / "train_results.json").read_text())["dash_switch_step"] == 3
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    _assert_stock_peft_reproduces(result, base, _batch(model_dir, ["the film was great", "dull and weak film"]))


def test_named_columns_train_exactly_as_the_default_ones(text, tmp_path):
    """--text_column_names/--label_column_name (run_classification.py's flags) only rename: same run, same metrics."""
    train_file, eval_file, model_dir = text
    renamed = []
    for f in (train_file, eval_file):
        with open(f, newline="") as src:
            rows = list(csv.DictReader(src))
        out = tmp_path / f.name
        with open(out, "w", newline="") as dst:
            writer = csv.DictWriter(dst, fieldnames=["review", "sentiment"])
            writer.writeheader()
            writer.writerows({"review": r["text"], "sentiment": r["label"]} for r in rows)
        renamed.append(out)
    common = ["--model_name_or_path", str(model_dir), "--task", "classification", "--target_modules",
              "query_proj,value_proj", "--max_steps", "2", *QUICK]
    default = main(parse_args([*common, "--train_file", str(train_file), "--eval_file", str(eval_file),
                               "--output_dir", str(tmp_path / "a")])).results
    named = main(parse_args([*common, "--train_file", str(renamed[0]), "--eval_file", str(renamed[1]),
                             "--text_column_names", "review", "--label_column_name", "sentiment",
                             "--output_dir", str(tmp_path / "b")])).results
    timing = ("runtime_s", "tokens_per_s")
    for r in (default, named):
        r["train"] = {k: v for k, v in r["train"].items() if k not in timing}
    assert named == default
    with pytest.raises(SystemExit):
        parse_args(["--model_name_or_path", "m", "--task", "causal-mc", "--train_file", "f", "--eval_split", "2",
                    "--output_dir", "o", "--label_column_name", "y"])


@pytest.mark.parametrize("method", ["eva", "lora_da"])
def test_classification_with_a_data_driven_init(text, tmp_path, method):
    # the classification collator yields transformers' BatchEncoding (a Mapping, not a dict); EVA reads the
    # loader's batches as they come
    train_file, eval_file, model_dir = text
    result = main(parse_args(["--model_name_or_path", str(model_dir), "--task", "classification", "--train_file",
                              str(train_file), "--eval_file", str(eval_file), "--target_modules",
                              "query_proj,value_proj", "--method", method, "--max_steps", "2", "--no-eval_before",
                              "--output_dir", str(tmp_path / "o"), *QUICK, "--adapter_options",
                              *INIT_OPTIONS[method]]))
    assert result.adapter.config.method == method and result.results["after"]["num_examples"] == 12


#: small statistics budgets for the data-driven inits (the toy task has 22 training rows)
INIT_OPTIONS = {"lora_init": ["lora_init_steps=3"], "tsd": ["lora_init_steps=3"], "eva": ["eva_max_batches=4"],
                "lora_da": ["lora_da_num_samples=16"], "lora_ga": ["lora_ga_batches=2"]}


@pytest.mark.parametrize("method", [m for m in shared.METHODS if m != "dash"])
def test_every_method_runs_and_reloads_in_stock_peft(mc, tmp_path, method):
    from transformers import AutoModelForCausalLM

    options = ["--adapter_options", *INIT_OPTIONS[method]] if method in INIT_OPTIONS else []
    result = _run_mc(mc, tmp_path / method, "--method", method, "--max_steps", "4", "--no-eval_before", *options)
    assert result.results["after"]["num_examples"] == 8 and result.adapter.config.method == method
    assert (result.adapter.num_steps, result.adapter.switched) == (4, method == "tsd")
    base = AutoModelForCausalLM.from_pretrained(mc[1], dtype=torch.float32)
    _assert_stock_peft_reproduces(result, base, _batch(mc[1], ["What color is the sun in picture 1?"]))


# ------------------------------------------------------------------------------------------ errors before training
def test_target_modules_that_match_nothing_list_the_linear_layers(mc, tmp_path):
    with pytest.raises(ValueError, match=r"match no module of LlamaForCausalLM. Its linear layer names are: "
                       r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        _run_mc(mc, tmp_path / "out", "--target_modules", "query,value")
    assert not (tmp_path / "out").exists()


def test_bad_data_fails_before_the_model_is_loaded(mc, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"examples": [{"input": "q", "target_scores": {"only": 1}}]}))
    with pytest.raises(ValueError, match=r"bad.json examples\[0\]: a multiple-choice example needs at least 2"):
        main(parse_args(["--model_name_or_path", str(tmp_path / "no-model-here"), "--task", "causal-mc",
                         "--train_file", str(bad), "--eval_file", str(bad), "--output_dir", str(tmp_path / "out")]))
    with pytest.raises(ValueError, match="dash_warmup_steps"):
        _run_mc(mc, tmp_path / "out", "--dash_warmup_steps", "0")
    with pytest.raises(SystemExit):
        parse_args(["--model_name_or_path", "m", "--task", "causal-mc", "--train_file", "f", "--output_dir", "o"])


def test_the_trainer_spellings_of_flags_mean_the_same(capsys):
    """transformers' Trainer names (--lr_scheduler_type, --warmup_steps, --save_steps, --bf16, ...) are accepted."""
    base = ["--model_name_or_path", "m", "--task", "causal-mc", "--train_file", "f", "--eval_split", "4",
            "--output_dir", "o"]
    assert parse_args([*base, "--validation_file", "v.json"]).eval_file == ["v.json"]  # run_classification.py's name
    ours = vars(parse_args([*base, "--lr_scheduler", "cosine", "--lr_warmup_steps", "5", "--checkpointing_steps", "7",
                            "--checkpoints_total_limit", "2", "--max_length", "64", "--mixed_precision", "bf16"]))
    trainer = vars(parse_args([*base, "--lr_scheduler_type", "cosine", "--warmup_steps", "5", "--save_steps", "7",
                               "--save_total_limit", "2", "--max_seq_length", "64", "--bf16"]))
    assert {**trainer, "bf16": False} == ours
    assert parse_args([*base, "--fp16", "--mixed_precision", "fp16"]).mixed_precision == "fp16"
    for bad, message in ((["--bf16", "--fp16"], "exclude each other"),
                         (["--fp16", "--mixed_precision", "bf16"], "--fp16 contradicts --mixed_precision bf16"),
                         (["--warmup_ratio", "1.5"], "--warmup_ratio must be in")):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])
        assert message in capsys.readouterr().err


def test_warmup_ratio_and_adam_settings_reach_the_run(mc, tmp_path, monkeypatch):
    seen = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            seen.append(kwargs)
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    lrs = {}
    for name, flags in (("ratio", ["--warmup_ratio", "0.5"]), ("steps", ["--warmup_steps", "2"])):
        _run_mc(mc, tmp_path / name, "--max_steps", "4", "--lr_scheduler_type", "linear", "--adam_beta1", "0.8",
                "--adam_beta2", "0.99", "--adam_epsilon", "1e-6", *flags)
        with open(tmp_path / name / "loss_log.csv") as f:
            lrs[name] = [float(row["lr"]) for row in csv.DictReader(f)]
    # linear warmup over ceil(0.5 * 4) = 2 steps to 1e-2, then linear decay to 0 at step 4 (logged after each step)
    assert lrs["ratio"] == lrs["steps"] == pytest.approx([5e-3, 1e-2, 5e-3, 0.0])
    assert [(k["betas"], k["eps"]) for k in seen] == [((0.8, 0.99), 1e-6)] * 2


def test_report_to_tensorboard_logs_what_loss_log_holds(mc, tmp_path):
    pytest.importorskip("tensorboard", reason="the tracker test needs tensorboard (the dev extra installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    _run_mc(mc, out, "--max_steps", "4", "--eval_steps", "2", "--report_to", "tensorboard", "--logging_dir", "tb-logs")
    events = EventAccumulator(str(out / "tb-logs" / "tsd-text"))  # (the hyperparameters go to a sub-folder)
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    with open(out / "loss_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert scalars["train/loss"] == [(int(r["step"]), pytest.approx(float(r["loss"]), rel=1e-6)) for r in rows]
    assert [s for s, _ in scalars["train/learning_rate"]] == [1, 2, 3, 4]
    evals = json.loads((out / "eval_results.json").read_text())
    assert scalars["eval/accuracy"] == [(0, pytest.approx(evals["before"]["accuracy"])),
                                        (2, pytest.approx(evals["history"][0]["accuracy"])),
                                        (4, pytest.approx(evals["after"]["accuracy"]))]


def test_the_trainers_epoch_and_no_strategies(mc, tmp_path, capsys):
    """--eval_strategy/--save_strategy epoch (GLUE recipes use them): evaluate and save at every epoch's end;
    no: neither, whatever --eval_steps/--save_steps say."""
    common = ["--num_train_epochs", "3", "--gradient_accumulation_steps", "2", "--no-eval_before"]
    result = _run_mc(mc, tmp_path / "epoch", *common, "--evaluation_strategy", "epoch", "--save_strategy", "epoch")
    out = result.output_dir  # 22 examples in batches of 4, 2 per update: 3 updates an epoch
    assert json.loads((out / "train_results.json").read_text())["steps"] == 9
    assert [h["step"] for h in json.loads((out / "eval_results.json").read_text())["history"]] == [3, 6]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    result = _run_mc(mc, tmp_path / "no", *common, "--eval_strategy", "no", "--eval_steps", "2", "--save_strategy",
                     "no", "--save_steps", "2")
    assert json.loads((result.output_dir / "eval_results.json").read_text())["history"] == []
    assert not list(result.output_dir.glob("checkpoint-*"))
    base = ["--model_name_or_path", "m", "--task", "causal-mc", "--train_file", "f", "--eval_split", "4",
            "--output_dir", "o"]
    for bad, message in ((["--eval_strategy", "steps"], "--eval_strategy steps needs --eval_steps N"),
                         (["--save_strategy", "steps", "--save_steps", "0"], "--save_strategy steps needs")):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])
        assert message in capsys.readouterr().err


def test_question_choices_jsonl_trains(mc, tmp_path):
    task_file, model_dir = mc
    examples = json.loads(task_file.read_text())["examples"]
    rows = [{"question": e["input"], "choices": list(e["target_scores"]),
             "answer": max(e["target_scores"], key=e["target_scores"].get)} for e in examples]
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = _run_mc((data, model_dir), tmp_path / "out", "--max_steps", "2")
    assert result.results["after"]["num_examples"] == 8 and result.results["train"]["steps"] == 2


def test_all_linear_targets_leave_the_trained_head_out(text):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(text[2], dtype=torch.float32)
    names = resolve_targets(model, parse_args(["--model_name_or_path", "m", "--task", "classification",
                                               "--train_file", "f", "--eval_split", "2", "--output_dir", "o",
                                               "--target_modules", "all-linear"]).target_modules,
                            ["classifier", "pooler"])
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(names) == {n for n in linear if not n.startswith(("classifier", "pooler"))} and names


def test_without_target_modules_peft_defaults_apply(text, mc):
    """As LoraConfig(target_modules=None): the query and value projections of peft's table for the model type."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    encoder = AutoModelForSequenceClassification.from_pretrained(text[2], dtype=torch.float32)
    llama = AutoModelForCausalLM.from_pretrained(mc[1], dtype=torch.float32)
    for model, want in ((encoder, {"deberta-v2": {"query_proj", "value_proj"}, "bert": {"query", "value"}}),
                        (llama, {"llama": {"q_proj", "v_proj"}})):
        names = resolve_targets(model, None, ["classifier", "pooler"])
        assert names and {n.rsplit(".", 1)[-1] for n in names} == want[model.config.model_type]
        assert len(names) == 2 * model.config.num_hidden_layers


def test_missing_pad_token_and_truncations_are_reported(tmp_path):
    task = toy_mc_task(12)
    (tmp_path / "task.json").write_text(json.dumps(task))
    tok = word_tokenizer([e["input"] + " " + " ".join(e["target_scores"]) for e in task["examples"]], pad=False)
    model_dir = save_tiny_model("llama", tmp_path / "llama", tok)
    result = _run_mc((tmp_path / "task.json", model_dir), tmp_path / "out", "--max_steps", "2", "--max_length", "10",
                     "--method", "lora", "--no-eval_before")
    resolved = json.loads((result.output_dir / "training_args.json").read_text())["resolved"]
    assert any("no pad token; using its eos token '[SEP]'" in n for n in resolved["notes"])
    assert resolved["truncated"] == {"train": 4, "eval": 8} and resolved["num_examples"] == {"train": 4, "eval": 8}
    assert any("4 of 4 train examples were longer than --max_length=10" in n for n in resolved["notes"])


# ---------------------------------------------------------------------------------- Trainer path == CLI path
def test_trainer_and_cli_select_the_same_directions(mc, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from shared.integrations import TSDCallback

    cli = _run_mc(mc, tmp_path / "cli", "--max_steps", "4", "--no-eval_before")

    # a user's own Trainer with the same data pieces, model, adapter configuration and seed
    args = TextTrainConfig.from_args(parse_args(["--model_name_or_path", str(mc[1]), "--task", "causal-mc",
                                                 "--train_file", str(mc[0]), "--eval_split", "8", "--target_modules",
                                                 LLAMA, "--output_dir", str(tmp_path / "t"), *QUICK]))
    tok = AutoTokenizer.from_pretrained(mc[1])
    ensure_pad_token(tok)
    data = causal.prepare(tok, *load_examples(args), args.max_length)
    model = AutoModelForCausalLM.from_pretrained(mc[1], dtype=torch.float32)
    config = dataclasses.replace(adapter_config(args), target_modules=resolve_targets(model, args.target_modules, None))
    adapter = shared.attach(model, config)
    targs = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=4, per_device_train_batch_size=4,
                              learning_rate=1e-2, seed=7, report_to=[], save_strategy="no", disable_tqdm=True,
                              logging_steps=100)  # same device as the CLI's accelerate
    Trainer(model=model, args=targs, train_dataset=data.train, data_collator=data.collate_train,
            callbacks=[TSDCallback(adapter)]).train()

    assert adapter.switched and cli.adapter.switched
    for name, _layer in adapter.dash_layers.items():
        mine, theirs = cli.adapter.dash_term(name), adapter.dash_term(name)
        assert mine.indices.tolist() == theirs.indices.tolist(), name
        torch.testing.assert_close(mine.U, theirs.U, atol=1e-4, rtol=0)
        torch.testing.assert_close(mine.Vh, theirs.Vh, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ checkpoints, resume
@pytest.mark.parametrize("ratio", [1, 10])
def test_resume_equals_uninterrupted_before_and_after_the_switch(mc, tmp_path, ratio):
    """Checkpoints every 2 updates (accumulation 2, 3 updates per epoch, dropout on, switch at 3); resuming from
    step 2 (before the switch, mid-epoch) or step 4 (after it, next epoch) ends where the uninterrupted run ends,
    also with λ in its own parameter group at 10 times the learning rate."""
    from safetensors.torch import load_file

    extra = ["--max_steps", "8", "--gradient_accumulation_steps", "2", "--lora_dropout", "0.1",
             "--checkpointing_steps", "2", "--no-eval_before", "--dash_lr_ratio", str(ratio)]
    full = _run_mc(mc, tmp_path / "full", *extra)
    assert [p.name for p in sorted((tmp_path / "full").glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-4",
                                                                                  "checkpoint-6"]
    ref = load_file(tmp_path / "full" / "adapter_model.safetensors")
    ref_log = (tmp_path / "full" / "loss_log.csv").read_text().splitlines()
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        out = tmp_path / f"from-{ckpt}"
        resumed = _run_mc(mc, out, *extra, "--resume_from_checkpoint", str(tmp_path / "full" / ckpt))
        assert resumed.results["train"]["dash_switch_step"] == 3 and resumed.adapter.num_steps == 8
        log = [r.split(",")[:4] for r in (out / "loss_log.csv").read_text().splitlines()]  # step, epoch, loss, lr
        want = [r.split(",")[:4] for r in ref_log]
        got = load_file(out / "adapter_model.safetensors")
        assert got.keys() == ref.keys()
        # bit for bit on every device: a resume recomputes the dash directions with the SVD kernels the switch
        # used (on an H100 a resume that restored the adapter on the CPU was 1 ulp off in its first loss)
        assert log == want
        diffs = {key: (got[key] - ref[key]).abs().max().item() for key in ref}
        worst = max(diffs, key=diffs.get)
        assert diffs[worst] <= 1e-6, f"{ckpt}: tensors differ, most {worst} by {diffs[worst]:.3g}"
        assert resumed.results["after"] == full.results["after"]


def test_dash_lr_ratio_gives_lambda_its_own_learning_rate_throughout(mc, tmp_path, monkeypatch):
    """--dash_lr_ratio 10: λ in the optimizer's second group at 10 × the lr at every step of the schedule (warm-up
    and linear decay scale both groups), everything else in the first; λ trains, and a resume must ask for the
    same ratio."""
    optimizers, lrs = [], []

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

        def step(self, *args, **kwargs):
            lrs.append([g["lr"] for g in self.param_groups])
            return super().step(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    result = _run_mc(mc, tmp_path, "--max_steps", "6", "--dash_lr_ratio", "10", "--warmup_steps", "2",
                     "--checkpointing_steps", "3", "--no-eval_before")
    [opt] = optimizers
    lam = {id(result.adapter.dash_term(n).lam) for n in result.adapter.dash_layers}
    assert [{id(p) for p in g["params"]} for g in opt.param_groups] == [
        {id(p) for p in result.adapter.trainable_parameters()} - lam, lam]
    assert len(lrs) == 6 and lrs[0][0] == 0.0 and all(b == pytest.approx(10 * a) for a, b in lrs)
    assert any(result.adapter.dash_term(n).lam.abs().max() > 0 for n in result.adapter.dash_layers)
    with pytest.raises(ValueError, match="with dash_lr_ratio 10; this run asks for dash rank 4 .* dash_lr_ratio 1"):
        _run_mc(mc, tmp_path, "--max_steps", "6", "--resume_from_checkpoint", "latest")
    with pytest.raises(SystemExit):
        parse_args(["--model_name_or_path", "m", "--task", "causal-mc", "--train_file", "f", "--eval_split", "2",
                    "--output_dir", "o", "--dash_lr_ratio", "0"])


def test_causal_only_flags_are_refused_for_classification(capsys):
    base = ["--model_name_or_path", "m", "--task", "classification", "--train_file", "t.csv", "--eval_file",
            "e.csv", "--output_dir", "o"]
    for extra, says in [(["--eval_mode", "generate"], "--eval_mode generate: for --task causal-mc only"),
                        (["--prompt_template", "llm-adapters"], "--prompt_template: for --task causal-mc only"),
                        (["--train_file", "a.csv", "b.csv"], "--train_file: --task classification reads one file")]:
        with pytest.raises(SystemExit):
            parse_args([*base, *extra])
        assert says in capsys.readouterr().err


def test_checkpoint_limit_latest_and_a_mismatched_resume(mc, tmp_path):
    extra = ["--max_steps", "5", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--no-eval_before"]
    _run_mc(mc, tmp_path, *extra)
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-3", "checkpoint-4"]
    assert not list(tmp_path.glob(".checkpoint-*"))
    resumed = _run_mc(mc, tmp_path, *extra, "--max_steps", "6", "--resume_from_checkpoint", "latest")
    assert resumed.results["train"]["steps"] == 6 and resumed.adapter.num_steps == 6
    with pytest.raises(ValueError, match="holds a dash adapter of rank 4"):
        _run_mc(mc, tmp_path / "other", "--method", "lora", "--resume_from_checkpoint", str(tmp_path / "checkpoint-4"))
    with pytest.raises(ValueError, match="not a checkpoint of this trainer"):
        _run_mc(mc, tmp_path / "other", "--resume_from_checkpoint", str(tmp_path))
    # accelerate's non-tensor state (RNG, optimizer, scheduler) is torch.save'd; a resume loads it with torch's
    # weights-only unpickler, so a tampered checkpoint cannot run code
    import pickle
    import shutil
    from pathlib import Path

    evil = tmp_path / "evil" / "checkpoint-5"
    shutil.copytree(tmp_path / "checkpoint-5", evil)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (evil / "random_states_0.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match=r"random_states_0.pkl: cannot restore the RNG state \(UnpicklingError: "
                                         r"Weights only load failed"):
        _run_mc(mc, tmp_path / "evil", *extra, "--max_steps", "6", "--resume_from_checkpoint", str(evil))
    assert not marker.exists()
    (evil / "random_states_0.pkl").unlink()  # missing (a process the saving run lacked): a warning, as in the Trainer
    with pytest.warns(UserWarning, match=r"random_states_0.pkl does not exist .* will not repeat the interrupted"):
        resumed = _run_mc(mc, tmp_path / "evil", *extra, "--max_steps", "6", "--resume_from_checkpoint", str(evil))
    assert resumed.adapter.num_steps == 6
    # a new run over them is refused (a later `latest` could resume the old run), unless told to start over
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-4, checkpoint-5\): "
                                         r"continue it with --resume_from_checkpoint latest, start over with "
                                         r"--overwrite_output_dir"):
        _run_mc(mc, tmp_path, *extra)
    _run_mc(mc, tmp_path, *extra, "--max_steps", "2", "--overwrite_output_dir")
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-1"]


@pytest.mark.parametrize("method", sorted(INIT_OPTIONS))
def test_data_driven_inits_with_gradient_checkpointing(mc, tmp_path, method):
    """Every data-driven init under --gradient_checkpointing; the batches reach the core with their prompt-masked
    labels (the core's gradient statistics use the attention mask), and LoRA-DA's population N is the training set."""
    result = _run_mc(mc, tmp_path / method, "--method", method, "--max_steps", "2", "--no-eval_before",
                     "--gradient_checkpointing", "--adapter_options", *INIT_OPTIONS[method])
    assert result.adapter.num_steps == 2 and result.adapter.config.method == method
    assert result.adapter.config.lora_da_population == 22  # 30 rows minus the 8 held out
