"""Shared fixtures: tiny models built from configs (no hub), synthetic batches, a short training loop."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

#: where accelerate puts the trainers' models: tests that compare them with a stock reload run both here
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: for the fp16 variants of the mixed-precision tests
NEEDS_CUDA = pytest.mark.skipif(DEVICE.type != "cuda",
                                reason="fp16 mixed precision needs a CUDA device (accelerate refuses it on CPU)")
if DEVICE.type == "cuda":
    # the equivalence tests (resume vs uninterrupted, export vs trained) compare to 1e-6 and expect run-to-run
    # repeatability, which CUDA gives only with deterministic kernels and without TF32 (scripts/gpu_check.sh)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for backend in ("flash", "mem_efficient", "cudnn"):  # their attention backward is not deterministic; math is
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)

#: set by a launcher for its children: a test that launches processes must not hand down its own
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment for a multi-process launch from a test: no inherited rank variables, one thread per
    process, offline hubs, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
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


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent")
    return SHARED_DATA
