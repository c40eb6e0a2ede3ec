"""What the tests share: tiny models built from configs (no hub), synthetic batches, a short training loop, and
the environment for the processes some tests launch. (Fixtures and the session's torch settings are in
``conftest.py``.)"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

#: where accelerate puts the trainers' models: tests that compare them with a stock reload run both here
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: for the fp16 variants of the mixed-precision tests
NEEDS_CUDA = pytest.mark.skipif(DEVICE.type != "cuda",
                                reason="fp16 mixed precision needs a CUDA device (accelerate refuses it on CPU)")
#: set by a launcher for its children: a test that launches processes must not hand down its own
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment for a process launched from a test: no inherited rank variables, one thread per process,
    offline hubs, this checkout first on ``PYTHONPATH`` (its packages and ``tests``, whatever is installed), then
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": path,
            **extra}


#: the repository root, and the reference data beside it (tests that read it skip without it)
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "dense"]


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_bert(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def lm_batches(n: int = 6, batch_size: int = 4, seq: int = 12, seed: int = 1, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch_size, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # some padding, so masks matter
        labels = ids.clone()
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def cls_batches(n: int = 6, batch_size: int = 4, seq: int = 10, seed: int = 2, vocab: int = 128):
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(0, vocab, (batch_size, seq), generator=g),
         "attention_mask": torch.ones(batch_size, seq, dtype=torch.long),
         "labels": torch.randint(0, 2, (batch_size,), generator=g)}
        for _ in range(n)
    ]


def train(adapter, batches, steps: int, lr: float = 1e-2, accum: int = 1, optimizer=None):
    """Plain AdamW loop calling adapter.step() once per optimizer step."""
    model = adapter.model
    opt = optimizer or torch.optim.AdamW(adapter.trainable_parameters(), lr=lr)
    model.train()
    i = 0
    for _ in range(steps):
        for _ in range(accum):
            loss = model(**batches[i % len(batches)]).loss / accum
            loss.backward()
            i += 1
        opt.step()
        opt.zero_grad()
        adapter.step(opt)
    model.eval()
    return opt


def mse(model, batch):
    """The MSE loss of a toy regression batch ``(x, y)`` (the inits' tests)."""
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def tiny_unet():
    """A seeded diffusers UNet with one cross-attention level (the export tests)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32, norm_num_groups=8,
    ).eval()


def train_tiny_sdxl(out, *extra: str, steps: int = 6):
    """The SDXL trainer in this process on the embedded tiny SDXL: ``steps`` steps, dash switch at 3, s = 2, batch 2,
    one validation image of 2 steps, no checkpoints; ``extra`` flags win. Returns the trainer's summary."""
    from accelerate.state import AcceleratorState

    import tsd_diffusion.train_sdxl as T

    AcceleratorState._reset_state(reset_partial_state=True)  # each run is its own "process" (as accelerate's tests do)
    argv = ["--pretrained_model_name_or_path", T.EMBEDDED_NAME, "--output_dir", str(out), "--max_train_steps",
            str(steps), "--dash_warmup_steps", "3", "--dash_directions", "2", "--train_batch_size", "2",
            "--num_validation_images", "1", "--validation_inference_steps", "2", "--checkpointing_steps", "1000",
            *extra]
    return T.main(T.parse_args(argv))


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models on a busy 2-core machine run much faster single-threaded (import it into a test module to use
    it there)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def kill_after_first_checkpoint(monkeypatch):
    """Make the SDXL trainer die (KeyboardInterrupt) right after its next checkpoint; returns the undo."""
    import tsd_diffusion.train_sdxl as T

    save = T.save_training_checkpoint

    def killed(*args, **kw):
        save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_training_checkpoint", killed)
    return lambda: monkeypatch.setattr(T, "save_training_checkpoint", save)
