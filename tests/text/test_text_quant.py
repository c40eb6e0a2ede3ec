"""The text trainer on a quantised base (QLoRA): ``--load_in_4bit`` / ``--load_in_8bit`` on a tiny LLaMA quantised on
the CPU, every method, the export reloaded by stock peft, and the refusals before any model loads."""

import json

import pytest
import torch

import shared
from shared import quantization
from tsd_text import causal
from tsd_text.tiny import write_toy_mc
from tsd_text.train import main, parse_args

LLAMA = "q_proj,k_proj,v_proj,up_proj,down_proj"
QUICK = ["--rank", "4", "--lora_alpha", "8", "--dash_warmup_steps", "2", "--dash_directions", "2",
         "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--seed", "7", "--no-report_plot"]
#: small statistics budgets for the data-driven inits (the toy task has 22 training rows)
INIT_OPTIONS = {"lora_init": ["lora_init_steps=3"], "tsd": ["lora_init_steps=3"], "eva": ["eva_max_batches=4"],
                "lora_da": ["lora_da_num_samples=16"], "lora_ga": ["lora_ga_batches=2"]}


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    return write_toy_mc(tmp_path_factory.mktemp("mc"), 30)


def _args(mc, out, *extra):
    task_file, model_dir = mc
    return ["--model_name_or_path", str(model_dir), "--task", "causal-mc", "--train_file", str(task_file),
            "--eval_split", "8", "--target_modules", LLAMA, "--output_dir", str(out), *QUICK, *extra]


def _run(mc, out, *extra):
    pytest.importorskip("bitsandbytes", reason="--load_in_4bit needs bitsandbytes (the 'quant' extra)")
    return main(parse_args(_args(mc, out, *extra)))


@pytest.mark.filterwarnings("ignore:EVA stopped")
@pytest.mark.parametrize("method", shared.METHODS)
def test_every_method_trains_on_a_4bit_base_and_its_export_reloads_in_stock_peft(mc, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    options = ["--adapter_options", *INIT_OPTIONS[method]] if method in INIT_OPTIONS else []
    result = _run(mc, tmp_path / method, "--method", method, "--max_steps", "4", "--load_in_4bit",
                  "--bnb_4bit_use_double_quant", *options)
    adapter = result.adapter
    assert (adapter.num_steps, adapter.switched) == (4, method in ("dash", "tsd"))
    layers = dict(quantization.quantized_layers(adapter.model))
    assert {type(m).__name__ for m in layers.values()} == {"Linear4bit"}
    assert {m.weight.quant_state.quant_type for m in layers.values()} == {"nf4"}
    losses = _losses(result.output_dir)
    assert len(losses) == 4 and torch.isfinite(torch.tensor(losses)).all()
    notes = json.loads((result.output_dir / "training_args.json").read_text())["resolved"]["notes"]
    assert any("quantised the residual again" in n for n in notes) == adapter.config.residualises_base
    # a standard peft adapter against the original, unquantised base: its update is the trained one
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(mc[1], dtype=torch.float32),
                                         str(result.output_dir))
    for name in adapter.layers:
        torch.testing.assert_close(reloaded.base_model.model.get_submodule(name).get_delta_weight("default"),
                                   adapter.delta_weight(name), rtol=0, atol=1e-6, msg=name)


def _losses(out):
    from tsd_common.training import read_loss_log

    return [row["loss"] for row in read_loss_log(out)]


@pytest.mark.parametrize("method", ["lora_da", "tsd"])
def test_4bit_data_driven_inits_under_gradient_checkpointing_and_8bit(mc, tmp_path, method):
    """peft's prepare_model_for_kbit_training turns gradient checkpointing on before the init runs."""
    result = _run(mc, tmp_path / "4bit", "--method", method, "--max_steps", "2", "--no-eval_before", "--load_in_4bit",
                  "--gradient_checkpointing", "--adapter_options", *INIT_OPTIONS[method])
    assert result.adapter.model.is_gradient_checkpointing and result.adapter.num_steps == 2
    result = _run(mc, tmp_path / "8bit", "--method", method, "--max_steps", "2", "--no-eval_before", "--load_in_8bit",
                  "--adapter_options", *INIT_OPTIONS[method])
    assert {type(m).__name__ for _, m in quantization.quantized_layers(result.adapter.model)} == {"Linear8bitLt"}
    assert result.adapter.num_steps == 2


def test_quantisation_flags_that_cannot_work_are_refused_before_any_model_loads(mc, tmp_path, monkeypatch):
    import importlib.util

    from tsd_text import classification
    from tsd_text.tiny import write_toy_classification

    monkeypatch.setattr(causal, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(classification, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"--load_in_8bit needs bitsandbytes: pip install 'tsd-lora\[quant\]'"):
        main(parse_args(_args(mc, tmp_path / "a", "--load_in_8bit")))
    monkeypatch.undo()
    monkeypatch.setattr(classification, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    train, eval_, model_dir = write_toy_classification(tmp_path / "cls", 12, 6)
    pytest.importorskip("bitsandbytes", reason="the classification refusal is checked once bitsandbytes is found")
    with pytest.raises(ValueError, match="--load_in_4bit is for --task causal-mc.*classification head"):
        main(parse_args(["--model_name_or_path", str(model_dir), "--task", "classification", "--train_file",
                         str(train), "--eval_file", str(eval_), "--output_dir", str(tmp_path / "b"), "--load_in_4bit"]))
    for bad in (["--load_in_4bit", "--load_in_8bit"], ["--bnb_4bit_quant_type", "fp4"],
                ["--load_in_8bit", "--bnb_4bit_use_double_quant"]):
        with pytest.raises(SystemExit):
            parse_args(_args(mc, tmp_path / "c", *bad))
    assert not any((tmp_path / d).exists() for d in "abc")
