"""Gradio app that compares SDXL LoRA adapters (e.g. LoRA vs LoRA-Dash) side by side, plus their TSD diagnostics.

One base pipeline is loaded once; every adapter is loaded once into it as a named diffusers adapter and
switched with ``set_adapters`` under a lock, so concurrent requests never mix adapters (the events also share
one queue slot). Every column (``baseline`` = no adapter, then each adapter) gets the same seeds, so the
columns start from identical latents and differ only by the adapter.

The handlers are plain methods of :class:`CompareApp` (testable without a server): :meth:`CompareApp.generate`,
:meth:`CompareApp.slide`, :meth:`CompareApp.batch`, :meth:`CompareApp.tsd_layers`. They never raise on bad
input: a readable message goes to the status line, and a failure of one request leaves the app serving.

Adapters come only from the command line or from a fixed folder (:func:`resolve_adapters`); nothing in the UI
takes a path. An adapter that cannot be used (missing dir, no weights file, trained on a base of other shapes)
is reported in the UI and left out; the others keep working.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image, ImageDraw

import shared.errors
from shared.export import DIFFUSERS_WEIGHT_NAME
from shared.methods import names
from tsd_common.launch import run_cli

from .fidelity import METRICS
from .mini_sdxl import CLASSES, EVALUATION_DIR, MINI_NAME
from .tiny import resolve_pretrained

__all__ = [
    "BASELINE",
    "DEFAULT_ADAPTERS_ROOT",
    "LIVE_TEMPLATES",
    "OBJECT_TEMPLATES",
    "AdapterInfo",
    "CompareApp",
    "NoAdaptersError",
    "build_app",
    "cli",
    "find_recent_adapters",
    "launch",
    "parse_adapter_spec",
    "prompt_templates",
    "resolve_adapters",
    "subject_of",
]

log = logging.getLogger(__name__)

BASELINE = "baseline"
DEFAULT_ADAPTERS_ROOT = "outputs"
GRID_CELL = 256  # batch grid cells are downscaled to at most this many pixels
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_LORA_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight$")

# The DreamBooth recontextualisation prompts (Ruiz et al. 2023, dataset prompt list); {} is "<token> <class>".
_COMMON_HEAD = (
    "a {} in the jungle", "a {} in the snow", "a {} on the beach", "a {} on a cobblestone street",
    "a {} on top of pink fabric", "a {} on top of a wooden floor", "a {} with a city in the background",
    "a {} with a mountain in the background", "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
)
_COMMON_TAIL = ("a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}")
OBJECT_TEMPLATES: tuple[str, ...] = _COMMON_HEAD + (
    "a {} with a wheat field in the background", "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background", "a {} floating on top of water",
    "a {} floating in an ocean of milk", "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror", "a {} on top of the sidewalk in a crowded street", "a {} on top of a dirt road",
    "a {} on top of a white rug",
) + _COMMON_TAIL
LIVE_TEMPLATES: tuple[str, ...] = _COMMON_HEAD + (
    "a {} wearing a red hat", "a {} wearing a santa hat", "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle", "a {} in a chef outfit", "a {} in a firefighter outfit",
    "a {} in a police outfit", "a {} wearing pink glasses", "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
) + _COMMON_TAIL
#: classes that get the live-subject prompts (DreamBooth's live subjects are its cats and dogs)
LIVE_CLASSES = frozenset({"cat", "dog", "kitten", "puppy", "animal", "pet", "bird", "horse", "person", "man",
                          "woman", "boy", "girl", "baby"})


class NoAdaptersError(ValueError):
    """No adapter was given and none was found under the adapters folder."""


class InputError(ValueError):
    """Bad user input; the message is shown in the UI as it is."""


# ---------------------------------------------------------------------------------------------- adapters on disk
def prompt_templates(class_name: str) -> tuple[str, ...]:
    """The 25 DreamBooth templates for a class: live-subject ones for animals and people, object ones otherwise."""
    return LIVE_TEMPLATES if class_name.strip().lower() in LIVE_CLASSES else OBJECT_TEMPLATES


def subject_of(training_args: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(token, class)`` from a trainer's ``instance_prompt`` (and ``class_prompt``), e.g. ``("sks", "dog")``.

    The class is the longest word suffix shared with ``class_prompt`` (else the last word of the instance
    prompt); the token is the word before it. None when the instance prompt is too short to tell.
    """
    words = str(training_args.get("instance_prompt") or "").split()
    class_words = str(training_args.get("class_prompt") or "").split()
    n = 0
    while n < min(len(words) - 1, len(class_words)) and words[-1 - n] == class_words[-1 - n]:
        n += 1
    n = max(n, 1)
    if len(words) < n + 1:
        return None
    return words[-n - 1], " ".join(words[-n:])


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """``name=DIR`` (or a bare ``DIR``, named after its folder) -> ``(name, Path(DIR))``."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = _safe_name(Path(spec).name), spec
    if not _NAME.match(name) or name == BASELINE:
        raise ValueError(f"adapter name {name!r} in {spec!r}: use letters, digits, '_' or '-' (and not {BASELINE!r})")
    if not path:
        raise ValueError(f"--adapter {spec!r} has no directory after '='")
    return name, Path(path).expanduser()


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]+", "-", text).strip("-") or "adapter"


def find_recent_adapters(root: str | Path, limit: int = 2) -> dict[str, Path]:
    """The ``limit`` most recently trained adapter dirs under ``root`` (those holding the diffusers weights file).

    Recency is the weights file's modification time; the result is oldest first and named after each dir's
    path below ``root`` (``outputs/sdxl-lora`` -> ``sdxl-lora``).
    """
    root = Path(root)
    found = sorted((p.stat().st_mtime, p.parent) for p in root.rglob(DIFFUSERS_WEIGHT_NAME) if p.is_file())
    recent = found[-limit:] if limit > 0 else []
    out: dict[str, Path] = {}
    for _, d in recent:
        name = base = _safe_name("-".join(d.relative_to(root).parts) or d.name)
        i = 2
        while name in out or name == BASELINE:
            name, i = f"{base}-{i}", i + 1
        out[name] = d
    return out


def resolve_adapters(specs: Sequence[str], root: str | Path = DEFAULT_ADAPTERS_ROOT) -> dict[str, Path]:
    """The adapters to compare: the ``--adapter`` specs, else the two most recent ones under ``root``.

    Raises :class:`NoAdaptersError` (with the commands that make some) when there are none.
    """
    if specs:
        out: dict[str, Path] = {}
        for spec in specs:
            name, path = parse_adapter_spec(spec)
            if name in out:
                raise ValueError(f"adapter name {name!r} is given twice")
            out[name] = path
        return out
    found = find_recent_adapters(root) if Path(root).is_dir() else {}
    if not found:
        raise NoAdaptersError(
            f"no trained adapter (a folder with {DIFFUSERS_WEIGHT_NAME}) under {str(root)!r}.\n"
            "Train two on the embedded default, then run this again:\n"
            f"  accelerate launch apps/train_sdxl.py --method lora --output_dir {root}/lora\n"
            f"  accelerate launch apps/train_sdxl.py --method dash --output_dir {root}/dash\n"
            "or name them: python apps/compare.py --adapter lora=DIR --adapter dash=DIR")
    return found


def default_base(adapters: Mapping[str, str | Path]) -> str:
    """The base the adapters were trained on (``pretrained_model_name_or_path`` in the first one's
    ``training_args.json``), else the shipped mini SDXL."""
    for path in adapters.values():
        try:
            base = json.loads((Path(path) / "training_args.json").read_text()).get("pretrained_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(base, str) and base:
            return base
    return MINI_NAME


@dataclass
class AdapterInfo:
    """What the app knows about one adapter: files, training record, and whether it is loaded."""

    name: str
    path: Path
    loaded: bool = False
    notes: list[str] = field(default_factory=list)  # why it is not loaded, or what to know about it
    training_args: dict[str, Any] = field(default_factory=dict)
    ranks: tuple[int, int] | None = None  # (min, max) rank over the LoRA layers of the weights file
    layers: int = 0
    parameters: int = 0
    size_bytes: int = 0
    method: str = ""

    @property
    def weights(self) -> Path:
        return self.path / DIFFUSERS_WEIGHT_NAME

    @property
    def message(self) -> str:
        return "; ".join(self.notes)

    def row(self) -> list[Any]:
        """One row of the adapter table (see :data:`CompareApp.TABLE_HEADERS`)."""
        ta = self.training_args
        ranks = "" if self.ranks is None else (str(self.ranks[0]) if self.ranks[0] == self.ranks[1]
                                               else f"{self.ranks[0]}-{self.ranks[1]}")
        return [self.name, "loaded" if self.loaded else "not loaded", self.method, ta.get("rank", ""), ranks,
                ta.get("dash_directions", "") if self.method in names(dash_phase=True) else "", self.layers,
                self.parameters, round(self.size_bytes / 2**20, 3), ta.get("max_train_steps", ""),
                ta.get("instance_prompt", ""), *self.validation_scores(), self.message]

    def validation_scores(self) -> tuple[Any, Any, Any, Any, Any]:
        """The trainer's last validation metrics: the subject probe of the subject prompt and of the class prompt
        (leakage; mini SDXL bases), and the subject prompt's DINO, CLIP-I and CLIP-T (``--eval_dino_model``,
        ``--eval_clip_model``); blank where the run wrote none."""
        steps = sorted(self.path.glob("validation/step-*/metrics.json"), key=lambda p: int(p.parent.name[5:]))
        try:
            metrics = json.loads(steps[-1].read_text()) if steps else []
        except (OSError, ValueError):
            return "", "", "", "", ""
        metrics = [m for m in metrics if isinstance(m, dict)]
        probes = [round(m["subject_probe"], 3) for m in metrics if "subject_probe" in m]
        first = metrics[0] if metrics else {}
        return (probes[0] if probes else "", probes[1] if len(probes) > 1 else "",
                *(round(first[k], 3) if isinstance(first.get(k), (int, float)) else "" for k in METRICS))


def _read_adapter(name: str, path: Path) -> tuple[AdapterInfo, dict[str, torch.Tensor] | None]:
    """Read an adapter dir without touching any model: info, and the weights (None, with a message, if unusable)."""
    from safetensors import safe_open

    info = AdapterInfo(name, path)
    if not path.is_dir():
        info.notes.append(f"adapter folder {str(path)!r} does not exist")
        return info, None
    if not info.weights.is_file():
        info.notes.append(f"{str(path)!r} has no {DIFFUSERS_WEIGHT_NAME} (train with apps/train_sdxl.py "
                          "--output_format diffusers or kohya)")
        return info, None
    args_file = path / "training_args.json"
    if args_file.is_file():
        try:
            info.training_args = json.loads(args_file.read_text())
        except (OSError, ValueError) as e:
            info.notes.append(f"training_args.json unreadable ({e})")
    try:
        with safe_open(str(info.weights), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file: say so, keep serving the others
        info.notes.append(f"cannot read {info.weights.name}: {_describe(e)}")
        return info, None
    info.size_bytes = info.weights.stat().st_size
    info.parameters = sum(t.numel() for t in state.values())
    ranks = [t.shape[0] for k, t in state.items() if ".lora_A." in k or ".lora_down." in k]
    info.layers = len(ranks)
    info.ranks = (min(ranks), max(ranks)) if ranks else None
    try:
        info.method = ",".join(sorted(set(json.loads(meta.get("tsd_methods", "{}")).values())))
    except (ValueError, AttributeError):
        info.method = ""
    info.method = info.method or str(info.training_args.get("method", ""))
    return info, state


def _describe(e: BaseException) -> str:
    """``Type: first line of the message``: readable in the UI, the traceback stays in the server log."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _module(root: torch.nn.Module, name: str) -> torch.nn.Module | None:
    for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def shape_problems(pipe: Any, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Where a diffusers-format LoRA state dict does not fit ``pipe``: missing layers or other shapes.

    Keys in other formats (kohya) are left to diffusers' own loading.
    """
    problems = []
    for key, tensor in state.items():
        m = _LORA_KEY.match(key)
        if m is None:
            continue
        component, module_name, ab = m.groups()
        module = _module(getattr(pipe, component), module_name)
        weight = getattr(module, "weight", None)
        if weight is None:
            problems.append(f"{component}.{module_name}: no such layer in this base")
            continue
        dim = 1 if ab == "A" else 0  # lora_A is (r, in, ...), lora_B is (out, r, ...); weight is (out, in, ...)
        if tensor.shape[dim] != weight.shape[dim]:
            problems.append(f"{key} has shape {list(tensor.shape)}, the base layer's weight {list(weight.shape)}")
    return problems


# ---------------------------------------------------------------------------------------------- the app
class CompareApp:
    """One pipeline, named adapters, the handlers. ``adapters`` maps a name to a trainer output dir."""

    TABLE_HEADERS = ["adapter", "status", "method", "rank (trained)", "rank (file)", "dash directions",
                     "LoRA layers", "parameters", "size (MiB)", "steps", "instance prompt", "subject probe",
                     "class-prompt leak", "DINO", "CLIP-I", "CLIP-T", "message"]

    def __init__(self, base: str, adapters: Mapping[str, str | Path], *, save_dir: str | Path,
                 device: str | None = None, dtype: torch.dtype | None = None, steps: int = 25,
                 guidance: float = 5.0, batch_size: int = 4) -> None:
        from diffusers import StableDiffusionXLPipeline

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
        self.base_name = base
        self.base = resolve_pretrained(base)
        self.save_dir = Path(save_dir)
        self.steps, self.guidance, self.batch_size = steps, guidance, batch_size
        self.pipe = StableDiffusionXLPipeline.from_pretrained(self.base, dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self._lock = threading.Lock()  # set_adapters mutates the shared pipeline: one request at a time
        self.adapters: dict[str, AdapterInfo] = {}
        for name, path in adapters.items():
            if not _NAME.match(name) or name == BASELINE:
                raise ValueError(f"adapter name {name!r}: use letters, digits, '_' or '-' (and not {BASELINE!r})")
            self.adapters[name] = self._load(name, Path(path))
        self.loaded = [n for n, a in self.adapters.items() if a.loaded]
        self.columns = [BASELINE, *self.loaded]
        subject = next((s for a in self.adapters.values() if (s := subject_of(a.training_args))), None)
        self.token, self.class_name = subject or ("sks", "object")
        if (Path(self.base) / EVALUATION_DIR).is_dir():  # the mini SDXL knows CIFAR captions, not DreamBooth scenes
            others = [c for c in CLASSES if c != self.class_name][:3]
            self.prompts = [f"a photo of {self.token} {self.class_name}", f"a {self.token} {self.class_name}",
                            f"a photo of a {self.class_name}", *(f"a photo of a {c}" for c in others)]
        else:
            self.prompts = [t.format(f"{self.token} {self.class_name}") for t in prompt_templates(self.class_name)]

    def _load(self, name: str, path: Path) -> AdapterInfo:
        info, state = _read_adapter(name, path)
        if state is None:
            return info
        problems = shape_problems(self.pipe, state)
        if problems:
            info.notes.append(f"does not fit the base {self.base_name!r} ({len(problems)} of {len(state)} tensors; "
                              f"trained on another base?), e.g. {problems[0]}")
            return info
        try:
            self.pipe.load_lora_weights(str(path), weight_name=DIFFUSERS_WEIGHT_NAME, adapter_name=name)
        except Exception as e:  # diffusers cleans up a failed load; report it and serve the others
            log.exception("loading adapter %s from %s failed", name, path)
            info.notes.append(f"loading failed: {_describe(e)}")
            return info
        info.loaded = True
        trained_on = info.training_args.get("pretrained_model_name_or_path")
        if trained_on and trained_on not in (self.base_name, self.base):
            info.notes.append(f"trained on {trained_on!r}, compared on {self.base_name!r}")
        return info

    def status_markdown(self) -> str:
        """The header: base, loaded adapters, and why any adapter is not loaded."""
        lines = [f"**Base** `{self.base_name}` · **columns** {', '.join(f'`{c}`' for c in self.columns)}"]
        lines += [f"- ⚠ `{a.name}` not loaded: {a.message}" if not a.loaded else f"- `{a.name}`: {a.message}"
                  for a in self.adapters.values() if a.notes]
        if not self.loaded:
            lines.append("- no adapter could be loaded: only the baseline column is shown")
        return "\n".join(lines)

    # ------------------------------------------------------------------ rendering
    def _render(self, column: str, prompts: list[str], negative: str | None, seeds: list[int], steps: int,
                guidance: float, scale: float, chunk: int, on_step: Callable[[int], None]) -> list[Image.Image]:
        """Images for one column, ``chunk`` prompts per pipeline call; the caller holds the lock."""
        if column == BASELINE:
            if self.loaded:
                self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([column], adapter_weights=[scale])

        def callback(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            on_step(i + 1)
            return kwargs

        images: list[Image.Image] = []
        for start in range(0, len(prompts), chunk):
            part = slice(start, start + chunk)
            images += self.pipe(
                prompt=prompts[part], negative_prompt=[negative] * len(prompts[part]) if negative else None,
                num_inference_steps=steps, guidance_scale=guidance,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[part]],
                callback_on_step_end=callback,
            ).images
        return images

    def _render_columns(self, prompts: list[str], negative: str, seeds: list[int], steps: int, guidance: float,
                        scale: float, chunk: int, progress: Callable[..., Any]) -> dict[str, list[Image.Image]]:
        total = len(self.columns) * -(-len(prompts) // chunk) * steps
        done = 0
        out = {}
        with self._lock:
            for column in self.columns:
                def on_step(i: int, column: str = column) -> None:
                    nonlocal done
                    done += 1
                    progress(done / total, desc=f"{column}: step {i}/{steps}")

                out[column] = self._render(column, prompts, negative.strip() or None, seeds, steps, guidance,
                                           scale, chunk, on_step)
        return out

    @staticmethod
    def _settings(seed: Any, steps: Any, guidance: Any, scale: Any) -> tuple[int, int, float, float]:
        try:
            seed_i, steps_i, guidance_f, scale_f = int(seed), int(steps), float(guidance), float(scale)
        except (TypeError, ValueError):
            raise InputError("seed and steps must be whole numbers, guidance and adapter scale numbers") from None
        if not 0 <= seed_i < 2**63:
            raise InputError(f"seed must be between 0 and 2^63-1, got {seed_i}")
        if not 1 <= steps_i <= 200:
            raise InputError(f"steps must be between 1 and 200, got {steps_i}")
        if not 0 <= guidance_f <= 50:
            raise InputError(f"guidance must be between 0 and 50, got {guidance_f}")
        if not -4 <= scale_f <= 4:
            raise InputError(f"adapter scale must be between -4 and 4, got {scale_f}")
        return seed_i, steps_i, guidance_f, scale_f

    @staticmethod
    def _failure(action: str, e: Exception) -> str:
        if isinstance(e, InputError):
            return f"⚠ {e}"
        log.exception("%s failed", action)
        return f"⚠ {action} failed: {_describe(e)}"

    # ------------------------------------------------------------------ handlers
    def generate(self, prompt: str, negative_prompt: str, seed: Any, steps: Any, guidance: Any, scale: Any,
                 num_images: Any, slider_a: str, slider_b: str,
                 progress: Callable[..., Any] = gr.Progress(),  # noqa: B008 - how Gradio injects a progress bar
                 ) -> tuple[list[tuple[Image.Image, str]], tuple[Image.Image, Image.Image] | None, str,
                            dict[str, Image.Image]]:
        """Render every column with the same seeds (``seed``, ``seed+1``, ... per image row).

        Each image is its own pipeline call, so the seed in its caption reproduces it alone (batched calls
        differ in the last bit).

        Returns the gallery items (row by row, one per column), the slider pair (the first images of
        ``slider_a`` and ``slider_b``), a status line and the first image per column (session state for
        :meth:`slide`).
        """
        try:
            prompt = (prompt or "").strip()
            if not prompt:
                raise InputError("the prompt is empty: type one or pick a template")
            seed, steps, guidance, scale = self._settings(seed, steps, guidance, scale)
            try:
                n = int(num_images)
            except (TypeError, ValueError):
                raise InputError("number of images must be a whole number") from None
            if not 1 <= n <= 8:
                raise InputError(f"number of images must be between 1 and 8, got {n}")
            t0 = time.perf_counter()
            seeds = [seed + i for i in range(n)]
            images = self._render_columns([prompt] * n, negative_prompt or "", seeds, steps, guidance, scale, 1,
                                          progress)
        except Exception as e:
            return [], None, self._failure("generation", e), {}
        gallery = [(images[c][i], f"{c} · seed {seeds[i]}") for i in range(n) for c in self.columns]
        status = (f"{len(self.columns)} columns × {n} image(s), seeds {seeds[0]}..{seeds[-1]}, {steps} steps, "
                  f"guidance {guidance:g}, adapter scale {scale:g}: {time.perf_counter() - t0:.1f} s")
        firsts = {c: images[c][0] for c in self.columns}
        return gallery, self.slide(slider_a, slider_b, firsts), status, firsts

    @staticmethod
    def slide(slider_a: str, slider_b: str, firsts: Mapping[str, Image.Image] | None,
              ) -> tuple[Image.Image, Image.Image] | None:
        """The slider pair for two columns of the last generation (None before one, or for an unknown column)."""
        if not firsts or slider_a not in firsts or slider_b not in firsts:
            return None
        return firsts[slider_a], firsts[slider_b]

    def batch(self, negative_prompt: str, seed: Any, steps: Any, guidance: Any, scale: Any,
              progress: Callable[..., Any] = gr.Progress(),  # noqa: B008 - how Gradio injects a progress bar
              ) -> tuple[Image.Image | None, str]:
        """Render all template prompts for every column into one grid (rows: prompts) and save it.

        The grid goes to ``<save_dir>/batch-<time>.png`` with a ``.json`` beside it (prompts, columns,
        settings). Each cell uses ``seed`` so the rows differ only by prompt and the columns only by adapter.
        """
        try:
            seed, steps, guidance, scale = self._settings(seed, steps, guidance, scale)
            images = self._render_columns(self.prompts, negative_prompt or "", [seed] * len(self.prompts), steps,
                                          guidance, scale, self.batch_size, progress)
            grid = _grid(images, self.columns)
            self.save_dir.mkdir(parents=True, exist_ok=True)
            stem = _unused_stem(self.save_dir / f"batch-{time.strftime('%Y%m%d-%H%M%S')}")
            grid.save(stem.with_suffix(".png"))
            record = {"base": self.base_name, "columns": self.columns, "prompts": self.prompts, "seed": seed,
                      "steps": steps, "guidance": guidance, "adapter_scale": scale,
                      "negative_prompt": negative_prompt or "",
                      "adapters": {n: str(self.adapters[n].path) for n in self.loaded}}
            stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        except Exception as e:
            return None, self._failure("batch", e)
        return grid, (f"{len(self.prompts)} prompts × {len(self.columns)} columns saved to "
                      f"`{stem.with_suffix('.png')}` (prompts per row in `{stem.with_suffix('.json').name}`)")

    def adapter_table(self) -> list[list[Any]]:
        """Rows of sizes and ranks, one per adapter (loaded or not); headers in :attr:`TABLE_HEADERS`."""
        return [a.row() for a in self.adapters.values()]

    def tsd_plots(self) -> list[tuple[Image.Image, str]]:
        """Each adapter's change-rate curves with the selected directions (the trainer's ``tsd_report.png``)."""
        out = []
        for a in self.adapters.values():
            try:
                with Image.open(a.path / "tsd_report.png") as im:
                    out.append((im.convert("RGB"), f"{a.name} ({a.method or 'unknown method'})"))
            except OSError:  # none written (or unreadable): the table below still tells the sizes
                continue
        return out

    def tsd_layers(self, name: str) -> tuple[list[list[Any]], list[str], str]:
        """The per-layer TSD report of one adapter (``tsd_report.csv``): rows, headers and a note."""
        info = self.adapters.get(name)
        if info is None:
            return [], [], f"⚠ unknown adapter {name!r}"
        path = info.path / "tsd_report.csv"
        if not path.is_file():
            return [], [], f"`{name}` has no tsd_report.csv (its trainer wrote no TSD diagnostics)"
        try:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
        except OSError as e:
            return [], [], f"⚠ cannot read {path.name} of `{name}`: {e}"
        if not rows:
            return [], [], f"`{name}`: tsd_report.csv is empty"
        header, body = rows[0], rows[1:]
        return body, header, (f"`{name}`: {len(body)} layers; `selected` = direction indices in descending-σ "
                              "order with the largest change rate δ = |Δσ|/σ")


def _unused_stem(stem: Path) -> Path:
    """``stem``, or ``stem-1``, ``stem-2``, ... : the first whose ``.png`` does not exist yet."""
    candidate, i = stem, 0
    while candidate.with_suffix(".png").exists():
        i += 1
        candidate = stem.with_name(f"{stem.name}-{i}")
    return candidate


def _grid(images: Mapping[str, list[Image.Image]], columns: Sequence[str]) -> Image.Image:
    """Rows of prompts × columns of adapters, with the column names on top and row numbers on the left."""
    first = images[columns[0]][0]
    scale = min(1.0, GRID_CELL / max(first.size))
    w, h = max(1, round(first.width * scale)), max(1, round(first.height * scale))
    left, top = 28, 16
    rows = len(images[columns[0]])
    grid = Image.new("RGB", (left + w * len(columns), top + h * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, column in enumerate(columns):
        draw.text((left + c * w + 2, 2), column[: max(4, w // 7)], fill="black")
        for r, img in enumerate(images[column]):
            grid.paste(img.convert("RGB").resize((w, h)), (left + c * w, top + r * h))
    for r in range(rows):
        draw.text((2, top + r * h + 2), str(r + 1), fill="black")
    return grid


# ---------------------------------------------------------------------------------------------- UI
def build_app(app: CompareApp) -> gr.Blocks:
    """The Blocks UI over the handlers of ``app``: a Compare tab and a TSD tab."""
    pair = app.loaded[:2] if len(app.loaded) >= 2 else [BASELINE, (app.loaded or [BASELINE])[0]]

    def show_layers(name: str) -> tuple[gr.Dataframe, str]:
        rows, headers, note = app.tsd_layers(name)
        return gr.Dataframe(rows, headers=headers or None), note

    with gr.Blocks(title="tsd-lora: compare adapters", analytics_enabled=False) as demo:
        gr.Markdown("## LoRA vs LoRA-Dash: compare adapters\n" + app.status_markdown())
        with gr.Tab("Compare"):
            with gr.Row():
                template = gr.Dropdown(app.prompts, value=app.prompts[0], label="DreamBooth prompt templates",
                                       info=f"subject: {app.token} {app.class_name}", scale=1)
                prompt = gr.Textbox(app.prompts[0], label="Prompt", scale=2)
            negative = gr.Textbox("", label="Negative prompt")
            with gr.Row():
                seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                steps = gr.Slider(1, 100, value=app.steps, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=app.guidance, step=0.5, label="Guidance")
                scale = gr.Slider(-2, 2, value=1.0, step=0.05, label="Adapter scale")
                num_images = gr.Slider(1, 8, value=1, step=1, label="Images per column")
            with gr.Row():
                slider_a = gr.Dropdown(app.columns, value=pair[0], label="Slider: left")
                slider_b = gr.Dropdown(app.columns, value=pair[1], label="Slider: right")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary")
                batch = gr.Button(f"Batch: all {len(app.prompts)} prompts → grid")
            status = gr.Markdown()
            gallery = gr.Gallery(label=" | ".join(app.columns), columns=len(app.columns), format="png",
                                 object_fit="contain", height="auto")
            slider = gr.ImageSlider(label="Slider", type="pil", format="png")
            grid = gr.Image(label="Batch grid", type="pil", format="png")
            firsts = gr.State({}, time_to_live=3600)  # per session: the first image of each column
        with gr.Tab("TSD"):
            gr.Markdown("Adapter sizes and ranks. A dash adapter's file has rank r+s: the s selected directions "
                        "are folded into a standard LoRA.")
            gr.Dataframe(app.adapter_table(), headers=CompareApp.TABLE_HEADERS, interactive=False)
            gr.Gallery(app.tsd_plots(), label="Change rate δ per singular direction (selected in red)", columns=2,
                       format="png", object_fit="contain", height="auto")
            first = app.loaded[0] if app.loaded else next(iter(app.adapters), "")
            rows, headers, note = app.tsd_layers(first)
            layer_pick = gr.Dropdown(list(app.adapters), value=first, label="Selected directions per layer")
            layer_note = gr.Markdown(note)
            layer_table = gr.Dataframe(rows, headers=headers or None, interactive=False)

        template.input(lambda t: t, template, prompt, api_visibility="private")
        generate.click(app.generate, [prompt, negative, seed, steps, guidance, scale, num_images, slider_a, slider_b],
                       [gallery, slider, status, firsts], api_name="generate", concurrency_limit=1,
                       concurrency_id="pipeline")
        batch.click(app.batch, [negative, seed, steps, guidance, scale], [grid, status], api_name="batch",
                    concurrency_limit=1, concurrency_id="pipeline")
        for pick in (slider_a, slider_b):
            pick.change(app.slide, [slider_a, slider_b, firsts], slider, api_visibility="private")
        layer_pick.change(show_layers, layer_pick, [layer_table, layer_note], api_visibility="private")
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True, queue_size: int = 16) -> None:
    """Serve ``demo`` on ``host:port`` (loopback unless told otherwise) with a bounded queue; no share link
    unless ``share``. With ``block=False`` it returns once the server is up (call ``demo.close()``)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this address can use the app (no authentication)", host)
    demo.queue(max_size=queue_size).launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=not block,
        show_error=False, ssr_mode=False, mcp_server=False, footer_links=["api", "settings"],
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``tsd-compare`` (``python apps/compare.py``)."""
    p = argparse.ArgumentParser(description="Compare SDXL LoRA adapters side by side (LoRA vs LoRA-Dash, plus a "
                                            "no-adapter baseline).")
    p.add_argument("--base", default=None,
                   help="hub id or local SDXL pipeline dir (default: the adapters' own base, else tsd-lora/mini-sdxl)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a trainer output dir (with pytorch_lora_weights.safetensors); repeat for more")
    p.add_argument("--adapters_root", default=DEFAULT_ADAPTERS_ROOT,
                   help="where to look for adapters when no --adapter is given (the two newest are used)")
    p.add_argument("--save_dir", default=None, help="where batch grids go (default <adapters_root>/compare)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio share link")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--steps", type=int, default=25, help="default inference steps in the UI")
    p.add_argument("--guidance", type=float, default=5.0, help="default guidance scale in the UI")
    p.add_argument("--batch_size", type=int, default=4, help="images per pipeline call in the batch grid")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    """Load the adapters (given, or the newest under ``--adapters_root``) on their base and serve the app; a bad or
    missing adapter spec is a user error (:class:`shared.errors.InputError`)."""
    try:
        adapters = resolve_adapters(args.adapter, args.adapters_root)
    except ValueError as e:
        raise shared.errors.InputError(str(e)) from None
    app = CompareApp(args.base or default_base(adapters), adapters,
                     save_dir=args.save_dir or Path(args.adapters_root) / "compare", device=args.device,
                     steps=args.steps, guidance=args.guidance, batch_size=args.batch_size)
    print(app.status_markdown())
    launch(build_app(app), host=args.host, port=args.port, share=args.share)


def cli(argv: Sequence[str] | None = None) -> None:
    """The ``tsd-compare`` command (``python apps/compare.py``): a user error is one line on stderr and exit
    status 2 (:func:`tsd_common.launch.run_cli`)."""
    run_cli(lambda: main(parse_args(argv)))
