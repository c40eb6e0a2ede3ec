"""--eval_mode generate and --prompt_template llm-adapters: LLM-Adapters' instructions per task, answer extraction on
hand-made outputs, and batched, left-padded generation on a tiny LLaMA against one unpadded generate per example."""

import json

import pytest
import torch

from tsd_text import causal
from tsd_text.data import DataError, alpaca_prompt, load_causal, load_mc
from tsd_text.generation import NO_ANSWER, extract_choice
from tsd_text.tiny import save_tiny_model, word_tokenizer
from tsd_text.train import main, parse_args


@pytest.mark.parametrize("text,choices,want", [
    ("the correct answer is answer2", ["answer1", "answer2", "answer3"], 1),
    ("The correct answer is Answer3.", ["answer1", "answer2", "answer3"], 2),  # case does not matter
    ("answer1 or maybe answer2", ["answer1", "answer2"], 0),  # the first named wins, as in LLM-Adapters
    ("it is false, not true", ["true", "false"], 1),
    ("solution2solution1", ["solution1", "solution2"], NO_ANSWER),  # not a whole word
    ("not sure", ["yes", "no"], NO_ANSWER),  # "no" inside "not" does not count
    ("no.", ["yes", "no"], 1),
    ("answer10 it is", [f"answer{k}" for k in range(1, 11)], 9),  # the longest of names starting at one place
    ("the correct answer is", ["answer1", "answer2"], NO_ANSWER),
    ("Maria, because she is better", ["Sarah", "Maria"], 1),  # plain choice texts (--prompt_template question)
    ("put it in the jar.", ["Put it in the bowl.", "put it in the jar."], 1),
    ("", ["a", "b"], NO_ANSWER),
])
def test_answer_extraction_on_hand_made_outputs(text, choices, want):
    assert extract_choice(text, choices) == want


def _records(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_llm_adapters_template_writes_each_tasks_instruction(tmp_path):
    """The instruction and answer names LLM-Adapters' commonsense_170k uses, from question/choices records."""
    rows = {"boolq": {"question": "Sky -- It is blue.\nis the sky blue", "choices": ["yes", "no"], "answer": 0},
            "piqa": {"question": "open a jar", "choices": ["twist the lid", "shout at it"], "answer": 0},
            "hellaswag": {"question": "Baking: She", "choices": ["bakes.", "flies.", "sings.", "naps."], "answer": 0},
            "winogrande": {"question": "Ann beat Bo so _ won.", "choices": ["Ann", "Bo"], "answer": 0},
            "arc_easy": {"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1}}
    got = {task: load_mc(_records(tmp_path / task / "test.jsonl", [row]), "llm-adapters", task)[0]
           for task, row in rows.items()}
    want = {
        "boolq": ("Please answer the following question with true or false, question: Sky -- It is blue.\nis the sky "
                  "blue\n\nAnswer format: true/false", ("true", "false")),
        "piqa": ("Please choose the correct solution to the question: open a jar\n\nSolution1: twist the lid\n\n"
                 "Solution2: shout at it\n\nAnswer format: solution1/solution2", ("solution1", "solution2")),
        "hellaswag": ("Please choose the correct ending to complete the given sentence: Baking: She\n\nEnding1: bakes."
                      "\n\nEnding2: flies.\n\nEnding3: sings.\n\nEnding4: naps.\n\nAnswer format: ending1/ending2/"
                      "ending3/ending4", ("ending1", "ending2", "ending3", "ending4")),
        "winogrande": ("Please choose the correct answer to fill in the blank to complete the given sentence: Ann beat "
                       "Bo so _ won.\n\nOption1: Ann\n\nOption2: Bo\n\nAnswer format: option1/option2",
                       ("option1", "option2")),
        "arc_easy": ("Please choose the correct answer to the question: 2+2?\n\nAnswer1: 3\n\nAnswer2: 4\n\nAnswer3: 5"
                     "\n\nAnswer format: answer1/answer2/answer3", ("answer1", "answer2", "answer3")),
    }
    for task, (instruction, names) in want.items():
        ex = got[task]
        assert ex.prompt == alpaca_prompt(instruction) and ex.generation_prompt == ex.prompt, task
        assert ex.context == ex.prompt + "the correct answer is " and ex.choices == names and ex.task == task
    assert got["arc_easy"].label == 1
    # the training row is LLM-Adapters' full response: "the correct answer is answer2"
    [row], _ = causal.encode(word_tokenizer([got["arc_easy"].context, "answer2"]), [got["arc_easy"]], 512)
    assert row["labels"].count(-100) == len(row["labels"]) - 1
    with pytest.raises(DataError, match=r"boolq is asked as true/false, so its choices must be yes/no or true/false"):
        load_mc(_records(tmp_path / "boolq.jsonl", [{**rows["boolq"], "choices": ["maybe", "no"]}]), "llm-adapters",
                "boolq")
    # the question template is unchanged, and generation starts from its context without the trailing space
    [plain] = load_mc(_records(tmp_path / "q.jsonl", [rows["arc_easy"]]))
    assert plain.generation_prompt == "Question: 2+2?\nAnswer:"


def _toy(tmp_path, n):
    things = ["sky", "grass", "rose"]  # blue, green, red
    rows = [{"question": f"What color is the {'very ' * (i % 4)}big {things[i % 3]} number {i}?",
             "choices": ["blue", "green", "red"],
             "answer": i % 3} for i in range(n)]
    train = _records(tmp_path / "colors" / "train.jsonl", rows[: n - 9])
    test = _records(tmp_path / "colors" / "test.jsonl", rows[n - 9:])
    texts = [ex.context + " ".join(ex.choices) for ex in load_causal(train, "llm-adapters", "colors")]
    texts += [ex.context + " ".join(ex.choices) for ex in load_mc(test, "llm-adapters", "colors")]
    return train, test, save_tiny_model("llama", tmp_path / "llama", word_tokenizer(texts + ["the correct answer is"]))


def test_generate_mode_end_to_end_and_batched_generation_equals_one_generate_per_example(tmp_path):
    from transformers import AutoTokenizer

    train, test, model_dir = _toy(tmp_path, 45)
    result = main(parse_args([
        "--model_name_or_path", str(model_dir), "--task", "causal-mc", "--train_file", str(train),
        "--eval_file", str(test), "--prompt_template", "llm-adapters", "--eval_mode", "generate",
        "--generation_num_beams", "1", "--generation_max_new_tokens", "8", "--method", "lora", "--rank", "4",
        "--target_modules", "q_proj,v_proj,up_proj,down_proj", "--learning_rate", "3e-2", "--max_steps", "30",
        "--per_device_train_batch_size", "6", "--per_device_eval_batch_size", "4", "--seed", "0", "--no-report_plot",
        "--output_dir", str(tmp_path / "out")]))
    evals = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    for when in ("before", "after"):
        assert set(evals[when]) == {"accuracy", "no_answer", "num_examples"} and evals[when]["num_examples"] == 9
    assert evals["before"]["no_answer"] == 1.0  # the random model names no choice
    assert evals["after"]["no_answer"] < 1.0  # trained, it answers in LLM-Adapters' format

    # the trainer's batched, left-padded generation gives what one unpadded generate per prompt gives
    model = result.adapter.model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = load_mc(test, "llm-adapters", "colors")
    data = causal.prepare(tok, examples, examples, 256, eval_mode="generate", max_new_tokens=8, num_beams=1)
    batch = data.collate_eval(data.eval)
    assert batch["prompt_mask"].min() == 0  # prompts of several lengths: left padding is exercised
    device = next(model.parameters()).device
    batched = data.predict(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    one_by_one = []
    for item in data.eval:
        ids = torch.tensor([item["prompt"]], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             num_beams=1, pad_token_id=tok.pad_token_id)
        one_by_one.append(extract_choice(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                                         item["choices"]))
    assert batched["pred"].tolist() == one_by_one
    accuracy = sum(p == it["label"] for p, it in zip(one_by_one, data.eval, strict=True)) / len(data.eval)
    assert evals["after"]["accuracy"] == pytest.approx(accuracy)
