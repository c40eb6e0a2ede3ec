"""transformers Trainer integration and the TSD diagnostics report."""

import csv

import torch

import shared
from tests.helpers import LLAMA_TARGETS, lm_batches, tiny_llama, train


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def test_trainer_callback_switches_at_exact_optimizer_step(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from shared.integrations import TSDCallback

    model = tiny_llama()
    adapter = shared.attach(model, shared.AdapterConfig(method="dash", r=4, alpha=8, target_modules=LLAMA_TARGETS,
                                                        dash_warmup_steps=3, dash_directions=2))
    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            seen.append((state.global_step, adapter.switched))

    data = ListDataset(lm_batches(n=8))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                             gradient_accumulation_steps=3, learning_rate=1e-2, eval_strategy="steps", eval_steps=1,
                             per_device_eval_batch_size=4, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=100, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                      callbacks=[TSDCallback(adapter), Record()])
    trainer.train()
    assert adapter.num_steps == 6
    assert seen == [(1, False), (2, False), (3, True), (4, True), (5, True), (6, True)]
    assert torch.cat([layer.tsd_dash["default"].lam for layer in adapter.layers.values()]).abs().max() > 0


def test_report_rows_csv_and_plot(tmp_path):
    model = tiny_llama()
    adapter = shared.attach(model, shared.AdapterConfig(method="dash", r=4, alpha=8, target_modules=LLAMA_TARGETS,
                                                        dash_warmup_steps=3, dash_directions=3))
    before = shared.tsd.report(adapter)  # before the switch: computed from the current (zero) update
    assert len(before) == len(adapter.layers) and all(float(r.change_rate.max()) == 0 for r in before)
    train(adapter, lm_batches(), steps=5)
    rows = shared.tsd.report(adapter)
    assert len(rows) == len(adapter.layers)
    for rep in rows:
        layer = adapter.layers[rep.name]
        assert rep.indices.tolist() == layer.tsd_dash["default"].indices.tolist()
        assert rep.rank_positions == [i + 1 for i in layer.tsd_dash["default"].indices.tolist()]
        assert 0 < rep.top_s_mass <= 1 and 0 <= rep.energy_share <= 1 and 0 <= rep.core_energy_share <= 1
    shared.tsd.write_report_csv(rows, tmp_path / "tsd.csv")
    with open(tmp_path / "tsd.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[0]["layer"] == rows[0].name
    shared.tsd.plot_change_rates(rows, tmp_path / "tsd.png")
    assert (tmp_path / "tsd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_for_method_without_dash_uses_current_update():
    model = tiny_llama()
    adapter = shared.attach(model, shared.AdapterConfig(method="lora", r=4, alpha=8, target_modules=["q_proj"]))
    train(adapter, lm_batches(), steps=3)
    rows = shared.tsd.report(adapter)
    assert len(rows) == 2 and all(float(r.change_rate.max()) > 0 for r in rows)
