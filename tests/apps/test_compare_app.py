"""The comparison app (tsd_diffusion.compare, apps/compare.py): handlers called directly, gradio_client against a
local server, and a headless Chromium click-through. Two tiny adapters (lora, dash) are trained in-process once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio", reason="the app needs gradio: pip install -e '.[app]'")

from PIL import Image  # noqa: E402

from tests.helpers import REPO  # noqa: E402
from tsd_diffusion import compare  # noqa: E402
from tsd_diffusion.tiny import EMBEDDED_NAME, resolve_pretrained  # noqa: E402

PROMPT = "a photo of sks teapot"
STEPS, GUIDANCE = 2, 5.0
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models run much faster on one thread here (and leave the other core to the rest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="session")
def outputs(tmp_path_factory) -> Path:
    """An outputs/ folder with two tiny trained adapters (lora, then dash) and one for another base."""
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file, save_file

    from tsd_diffusion.train_sdxl import main, parse_args

    root = tmp_path_factory.mktemp("outputs")
    with single_thread():
        for seed, method in enumerate(("lora", "dash")):  # different seeds: the two columns differ clearly
            AcceleratorState._reset_state(reset_partial_state=True)
            main(parse_args(["--pretrained_model_name_or_path", EMBEDDED_NAME, "--output_dir", str(root / method),
                             "--max_train_steps", "4", "--dash_warmup_steps", "2",
                             "--dash_directions", "2", "--train_batch_size", "2", "--num_validation_images", "1",
                             "--validation_inference_steps", "2", "--checkpointing_steps", "1000", "--method", method,
                             "--learning_rate", "1e-2", "--seed", str(seed)]))
    # "trained on another base": the same keys, but lora_B has 3 more output rows than the tiny UNet's layers
    other = root.parent / f"{root.name}-other-base"
    other.mkdir()
    state = load_file(root / "lora" / compare.DIFFUSERS_WEIGHT_NAME)
    save_file({k: torch.zeros(v.shape[0] + 3, *v.shape[1:]) if ".lora_B." in k else v for k, v in state.items()},
              other / compare.DIFFUSERS_WEIGHT_NAME)
    return root


@pytest.fixture(scope="session")
def app(outputs) -> compare.CompareApp:
    adapters = {"lora": outputs / "lora", "dash": outputs / "dash",
                "otherbase": outputs.parent / f"{outputs.name}-other-base", "missing": outputs / "no-such-dir"}
    with single_thread():
        return compare.CompareApp(EMBEDDED_NAME, adapters, save_dir=outputs / "compare", steps=STEPS,
                                  guidance=GUIDANCE, batch_size=25)


@pytest.fixture(scope="session")
def direct(outputs) -> dict[str, np.ndarray]:
    """Seed-0 images of a fresh stock pipeline per column: no adapter, then each adapter loaded alone."""
    from diffusers import StableDiffusionXLPipeline

    def image() -> np.ndarray:
        gen = torch.Generator("cpu").manual_seed(0)
        return np.asarray(pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gen).images[0])

    with single_thread():
        pipe = StableDiffusionXLPipeline.from_pretrained(resolve_pretrained(EMBEDDED_NAME))
        pipe.set_progress_bar_config(disable=True)
        out = {compare.BASELINE: image()}
        for name in ("lora", "dash"):
            pipe.load_lora_weights(str(outputs / name))
            out[name] = image()
            pipe.unload_lora_weights()
    return out


def pixels(img) -> np.ndarray:
    return np.asarray(img if isinstance(img, Image.Image) else Image.open(img))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app: compare.CompareApp) -> Iterator[str]:
    """The app on a free loopback port for the duration of the block; always shut down."""
    demo = compare.build_app(app)
    port = free_port()
    compare.launch(demo, host="127.0.0.1", port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------- pure helpers
def test_prompt_templates_and_subject():
    assert len(compare.OBJECT_TEMPLATES) == len(compare.LIVE_TEMPLATES) == 25
    assert compare.prompt_templates("dog") is compare.LIVE_TEMPLATES
    assert compare.prompt_templates("teapot") is compare.OBJECT_TEMPLATES
    assert compare.prompt_templates("stuffed animal") is compare.OBJECT_TEMPLATES
    assert "a {} wearing a santa hat" in compare.LIVE_TEMPLATES
    assert "a {} floating in an ocean of milk" in compare.OBJECT_TEMPLATES
    assert compare.subject_of({"instance_prompt": "a photo of sks teapot"}) == ("sks", "teapot")
    dog = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"}
    assert compare.subject_of(dog) == ("sks", "dog")
    assert compare.subject_of({"instance_prompt": "a zwx stuffed animal",
                               "class_prompt": "a stuffed animal"}) == ("zwx", "stuffed animal")
    assert compare.subject_of({}) is None


def test_adapter_specs_and_discovery(tmp_path):
    assert compare.parse_adapter_spec("dash=out/x") == ("dash", Path("out/x"))
    assert compare.parse_adapter_spec("out/my run") == ("my-run", Path("out/my run"))
    for bad in ("baseline=out/x", "a.b=out/x", "name="):
        with pytest.raises(ValueError):
            compare.parse_adapter_spec(bad)
    with pytest.raises(ValueError, match="twice"):
        compare.resolve_adapters(["a=x", "a=y"])

    with pytest.raises(compare.NoAdaptersError, match="apps/train_sdxl.py --method lora"):
        compare.resolve_adapters([], tmp_path / "absent")
    for _i, name in enumerate(["old", "newest", "middle"]):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / compare.DIFFUSERS_WEIGHT_NAME).write_bytes(b"")
        t = {"old": 1000, "middle": 2000, "newest": 3000}[name]
        os.utime(d / compare.DIFFUSERS_WEIGHT_NAME, (t, t))
    (tmp_path / "not-an-adapter").mkdir()
    found = compare.resolve_adapters([], tmp_path)
    assert found == {"runs-middle": tmp_path / "runs" / "middle", "runs-newest": tmp_path / "runs" / "newest"}


def test_cli_says_how_to_make_adapters(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "apps" / "compare.py"), "--adapters_root", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no trained adapter" in proc.stderr and "apps/train_sdxl.py --method dash" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------- handlers
def test_unusable_adapters_are_reported_not_loaded(app):
    assert app.columns == [compare.BASELINE, "lora", "dash"]
    status = app.status_markdown()
    assert "`otherbase` not loaded: does not fit the base" in status and "has shape [67, 4]" in status
    assert "`missing` not loaded: adapter folder" in status and "does not exist" in status
    assert "Traceback" not in status
    assert app.pipe.get_list_adapters() == {"unet": ["lora", "dash"]}
    assert (app.token, app.class_name) == ("sks", "teapot")
    assert app.prompts[0] == "a sks teapot in the jungle" and len(app.prompts) == 25


def test_generate_columns_match_direct_pipeline(app, direct):
    gallery, pair, status, firsts = app.generate(PROMPT, "", 0, STEPS, GUIDANCE, 1.0, 2, "lora", "dash")
    assert "3 columns × 2 image(s)" in status
    assert [caption for _, caption in gallery] == [f"{c} · seed {s}" for s in (0, 1) for c in app.columns]
    row0, row1 = gallery[:3], gallery[3:]
    # same seed per column: each equals its own stock pipeline run
    for column, (img, _) in zip(app.columns, row0, strict=True):
        np.testing.assert_array_equal(pixels(img), direct[column])
        assert firsts[column] is img
    assert not np.array_equal(direct["lora"], direct[compare.BASELINE])
    assert not np.array_equal(direct["dash"], direct[compare.BASELINE])
    assert not np.array_equal(direct["lora"], direct["dash"])
    assert not np.array_equal(pixels(row0[1][0]), pixels(row1[1][0]))  # seed 1 differs from seed 0
    assert pair == (firsts["lora"], firsts["dash"])
    again = app.generate(PROMPT, "", 1, STEPS, GUIDANCE, 1.0, 1, "lora", "dash")[0]  # seed 1 alone = row 2
    for (img, _), (img_again, caption) in zip(row1, again, strict=True):
        assert caption.endswith("seed 1")
        np.testing.assert_array_equal(pixels(img_again), pixels(img))


def test_adapter_scale_zero_equals_baseline(app, direct):
    firsts = app.generate(PROMPT, "", 0, STEPS, GUIDANCE, 0.0, 1, "lora", "dash")[3]
    for column in app.columns:
        np.testing.assert_array_equal(pixels(firsts[column]), direct[compare.BASELINE])


def test_bad_input_gives_message_and_app_keeps_serving(app, direct):
    for args, expected in [(("  ", "", 0, 2, 5, 1, 1), "the prompt is empty"),
                           ((PROMPT, "", 0, 0, 5, 1, 1), "steps must be between 1 and 200"),
                           ((PROMPT, "", "x", 2, 5, 1, 1), "must be whole numbers"),
                           ((PROMPT, "", -1, 2, 5, 1, 1), "seed must be between"),
                           ((PROMPT, "", 0, 2, 5, 1, 99), "number of images must be between 1 and 8")]:
        gallery, pair, status, firsts = app.generate(*args, "lora", "dash")
        assert (gallery, pair, firsts) == ([], None, {}) and expected in status and status.startswith("⚠")
    assert "the prompt is empty" in app.generate(None, None, 0, 2, 5, 1, 1, "lora", "dash")[2]
    assert "⚠" in app.batch("", 0, 500, 5, 1)[1]
    firsts = app.generate(PROMPT, "", 0, STEPS, GUIDANCE, 1.0, 1, "lora", "dash")[3]
    np.testing.assert_array_equal(pixels(firsts["dash"]), direct["dash"])


def test_slider_picks_two_columns(app):
    firsts = app.generate(PROMPT, "", 0, STEPS, GUIDANCE, 1.0, 1, "lora", "dash")[3]
    assert app.slide(compare.BASELINE, "dash", firsts) == (firsts[compare.BASELINE], firsts["dash"])
    assert app.slide("lora", "otherbase", firsts) is None
    assert app.slide("lora", "dash", {}) is None


def test_concurrent_requests_never_mix_adapters(app, direct):
    results: dict[int, dict] = {}

    def run(i: int) -> None:
        results[i] = app.generate(PROMPT, "", 0, STEPS, GUIDANCE, 1.0, 1, "lora", "dash")[3]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3
    for firsts in results.values():
        for column in app.columns:
            np.testing.assert_array_equal(pixels(firsts[column]), direct[column])


def test_batch_renders_all_prompts_into_a_saved_grid(app):
    calls = []
    grid, status = app.batch("", 3, 1, GUIDANCE, 1.0, progress=lambda frac, desc="": calls.append((frac, desc)))
    saved = sorted(app.save_dir.glob("batch-*.png"))
    assert saved and str(saved[-1]) in status, status
    assert pixels(saved[-1]).shape == pixels(grid).shape  # lossless PNG of the returned grid
    np.testing.assert_array_equal(pixels(saved[-1]), pixels(grid))
    record = json.loads(saved[-1].with_suffix(".json").read_text())
    assert record["prompts"] == app.prompts and record["columns"] == app.columns and record["seed"] == 3
    assert grid.size == (28 + 64 * 3, 16 + 64 * 25)  # tiny base: 64 px cells, 3 columns, 25 prompt rows
    assert calls[-1][0] == pytest.approx(1.0) and calls[-1][1].startswith("dash: step 1/1")


def test_tsd_tab_data(app):
    table = {row[0]: dict(zip(compare.CompareApp.TABLE_HEADERS, row, strict=True)) for row in app.adapter_table()}
    assert table["lora"]["rank (trained)"] == 4 and table["lora"]["rank (file)"] == "4"
    assert table["dash"]["rank (file)"] == "6" and table["dash"]["dash directions"] == 2  # r + s folded
    assert table["dash"]["parameters"] > table["lora"]["parameters"] > 0
    assert table["otherbase"]["status"] == "not loaded" and "does not fit" in table["otherbase"]["message"]
    assert table["missing"]["size (MiB)"] == 0
    assert [caption for _, caption in app.tsd_plots()] == ["lora (lora)", "dash (dash)"]
    rows, headers, note = app.tsd_layers("dash")
    selected = [row[headers.index("selected")] for row in rows]
    assert len(rows) == 32 and all(len(s.split()) == 2 for s in selected)  # s = --dash_directions 2 per layer
    assert app.tsd_layers("missing")[2].startswith("`missing` has no tsd_report.csv")
    assert app.tsd_layers("../etc")[2].startswith("⚠ unknown adapter")


# ---------------------------------------------------------------------------------------------- over HTTP
def test_gradio_client_returns_lossless_png_equal_to_direct(app, direct):
    from gradio_client import Client

    with serving(app) as url:
        client = Client(url, verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert {"/generate", "/batch"} <= set(endpoints)
        job = client.submit(PROMPT, "", 0, STEPS, GUIDANCE, 1.0, 1, "lora", "dash", api_name="/generate")
        gallery, pair, status = job.result(timeout=120)
        assert "3 columns × 1 image(s)" in status
        assert [item["caption"] for item in gallery] == [f"{c} · seed 0" for c in app.columns]
        for column, item in zip(app.columns, gallery, strict=True):
            assert item["image"].endswith(".png") and Image.open(item["image"]).format == "PNG"
            np.testing.assert_array_equal(pixels(item["image"]), direct[column])
        assert all(Image.open(p).format == "PNG" for p in pair)
        np.testing.assert_array_equal(pixels(pair[1]), direct["dash"])
        # bad input: a message, not an error; and the server keeps serving
        bad = client.submit("", "", 0, STEPS, GUIDANCE, 1.0, 1, "lora", "dash", api_name="/generate").result(timeout=60)
        assert bad[0] == [] and "the prompt is empty" in bad[2]
        again = client.submit(PROMPT, "", 0, STEPS, GUIDANCE, 1.0, 1, "lora", "dash",
                              api_name="/generate").result(timeout=120)
        np.testing.assert_array_equal(pixels(again[0][1]["image"]), direct["lora"])


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install -y chromium; "
                                             ".ci/run does it when run as root)")
def test_browser_click_generate_and_screenshot(app, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package drives chromium: "
                                                                 "pip install -e '.[dev]'")
    shot, tsd_shot = tmp_path / "compare.png", tmp_path / "tsd.png"
    with serving(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=BROWSER_FLAGS,
            viewport={"width": 1280, "height": 1000})
        try:
            page = browser.new_page()
            page.goto(url, timeout=60_000)
            page.get_by_role("button", name="Generate").click(timeout=30_000)
            page.get_by_text("3 columns × 1 image(s)").wait_for(timeout=90_000)
            page.wait_for_function("document.querySelectorAll('.gallery-container img, .grid-wrap img').length >= 3",
                                   timeout=30_000)
            assert page.get_by_text("does not fit the base").count() == 1  # the unusable adapter, said in words
            page.screenshot(path=str(shot), full_page=True)
            page.get_by_role("tab", name="TSD").click(timeout=10_000)
            page.get_by_text("Adapter sizes and ranks").wait_for(timeout=30_000)
            page.screenshot(path=str(tsd_shot), full_page=True)
        finally:
            browser.close()
    assert Image.open(shot).size[0] == 1280 and Image.open(tsd_shot).size[0] == 1280


def test_default_base_and_validation_scores_come_from_the_run_dirs(tmp_path):
    """With no --base the app uses the base the adapters were trained on; the table shows the subject probe of the
    subject prompt and of the class prompt from the run's *last* validation step."""
    from tsd_diffusion.mini_sdxl import MINI_NAME

    run = tmp_path / "run"
    run.mkdir()
    assert compare.default_base({"a": run}) == MINI_NAME  # no training_args.json
    (run / "training_args.json").write_text(json.dumps({"pretrained_model_name_or_path": "org/base"}))
    assert compare.default_base({"x": tmp_path / "missing", "a": run}) == "org/base"
    info = compare.AdapterInfo("a", run)
    assert info.validation_scores() == ("", "", "", "", "")
    for step, probes in ((50, (0.9, 0.8)), (200, (0.4, 0.2)), (100, (0.1, 0.1))):  # 200 is the last, not the newest
        d = run / "validation" / f"step-{step}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps([{"subject_probe": p} for p in probes] + [{"class_accuracy": 1.0}]))
    assert info.validation_scores() == (0.4, 0.2, "", "", "")
    (run / "validation" / "step-300").mkdir()
    (run / "validation" / "step-300" / "metrics.json").write_text(json.dumps(
        [{"prompt": "a photo of sks dog", "dino": 0.61234, "clip_i": 0.8, "clip_t": 0.25}, {"prompt": "a dog"}]))
    assert info.validation_scores() == ("", "", 0.612, 0.8, 0.25)  # the DreamBooth paper's metrics
    assert len(info.row()) == len(compare.CompareApp.TABLE_HEADERS)
