"""The text trainer on the real offline assets (scripts/fetch_assets.py): SmolLM2-135M on social_iqa (the SIQA dev
set of the ``commonsense`` asset), MiniLM on Pang & Lee polarity. Skipped, saying which asset and why, when the cache
lacks them."""

import json

import pytest
import torch

from tsd_common.assets import AssetMissingError, require_asset
from tsd_text import causal
from tsd_text.data import load_mc
from tsd_text.train import main, parse_args

pytestmark = pytest.mark.real_assets


def _require(*names):
    try:
        return [require_asset(n) for n in names]
    except AssetMissingError as e:  # names the asset, why it is missing and the command to fetch it
        pytest.skip(str(e))


@torch.no_grad()
def test_smollm2_cached_choice_scoring_matches_full_sequences_on_social_iqa():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, commonsense = _require("smollm2", "commonsense")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    examples = load_mc(commonsense / "socialiqa" / "validation.jsonl")[:4]
    data = causal.prepare(tok, examples, examples, max_length=256)
    scores = causal.choice_logprobs(model, data.collate_eval(data.eval))
    full = []
    for item in data.eval:  # each choice as one unpadded sequence, as training sees it
        for choice in item["choices"]:
            ids = torch.tensor([item["context"] + choice])
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            full.append(logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][-len(choice):].mean())
    torch.testing.assert_close(scores, torch.stack(full), atol=1e-4, rtol=1e-4)


def test_minilm_polarity_dash_learns(tmp_path):
    model_dir, polarity = _require("minilm", "polarity")
    result = main(parse_args([
        "--model_name_or_path", str(model_dir), "--task", "classification",
        "--train_file", str(polarity / "polarity.csv"), "--eval_split", "200", "--max_train_samples", "640",
        "--method", "dash", "--rank", "8", "--lora_alpha", "16", "--target_modules", "query,value",
        "--dash_warmup_steps", "10", "--dash_directions", "8", "--learning_rate", "3e-3", "--lr_scheduler", "constant",
        "--per_device_train_batch_size", "32", "--max_length", "64", "--seed", "0", "--no-report_plot",
        "--output_dir", str(tmp_path / "out")]))
    evals = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert result.results["train"]["steps"] == 20 and result.results["train"]["dash_switch_step"] == 10
    assert evals["after"]["num_examples"] == 200
    assert evals["after"]["accuracy"] > max(0.6, evals["before"]["accuracy"] + 0.05), evals


def test_smollm2_trains_on_the_eight_task_mixture_and_reports_each_task(tmp_path):
    """``--train_file commonsense:all --eval_file commonsense:all``: every task trained on and scored, the average
    being the mean of the eight (a few steps: the plumbing, not the accuracy)."""
    model_dir, _ = _require("smollm2", "commonsense")
    main(parse_args([
        "--model_name_or_path", str(model_dir), "--task", "causal-mc", "--train_file", "commonsense:all",
        "--eval_file", "commonsense:all", "--max_train_samples", "16", "--max_eval_samples", "24", "--method", "lora",
        "--rank", "2", "--target_modules", "q_proj,v_proj", "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--max_length", "128", "--seed", "0", "--no-eval_before", "--no-report_plot", "--output_dir",
        str(tmp_path / "out")]))
    after = json.loads((tmp_path / "out" / "eval_results.json").read_text())["after"]
    resolved = json.loads((tmp_path / "out" / "training_args.json").read_text())["resolved"]
    tasks = ["boolq", "piqa", "socialiqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    assert resolved["tasks"] == tasks
    assert resolved["examples_per_task"] == {"train": dict.fromkeys(tasks, 2), "eval": dict.fromkeys(tasks, 3)}
    assert [after[f"num_examples/{t}"] for t in tasks] == [3] * 8 and after["num_examples"] == 24
    assert after["accuracy"] == pytest.approx(sum(after[f"accuracy/{t}"] for t in tasks) / 8)
