"""Caption files (precedence over metadata.jsonl and the prompt, the instance prompt kept or prepended, caption
dropout, bad files named) and the masked loss (formula against a dense reference, no gradient from a masked-out
region, masks through the image's geometry, bad masks named before training)."""

import json

import pytest
import torch
from PIL import Image

from shared.errors import InputError
from tests.helpers import kill_after_first_checkpoint, single_thread, train_tiny_sdxl  # noqa: F401
from tsd_common.training import read_loss_log
from tsd_diffusion.data import DreamBoothDataset, collate
from tsd_diffusion.loss import latent_mask, unet_loss

PROMPT = "a photo of sks thing"


def photos(directory, n=4, size=(80, 64), mode="RGB"):
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new(mode, size, (30 * i, 100, 150) + ((255,) if mode == "RGBA" else ())).save(directory / f"p{i}.png")
    return directory


# ------------------------------------------------------------------------------------------------ caption files
def test_caption_precedence_prepend_and_dropout(tmp_path):
    d = photos(tmp_path / "d")
    (d / "p0.txt").write_text("sks thing on a red chair\nsecond line ignored\n")
    (d / "p1.txt").write_bytes("\ufeffsks thing in the snow".encode())  # a BOM is fine
    (d / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f, "text": t}) for f, t in
                                                [("p1.png", "loses to p1.txt"), ("p2.png", "sks thing from jsonl")]))
    ds = DreamBoothDataset(d, PROMPT, 64)
    assert [ds[i]["prompt"] for i in range(4)] == ["sks thing on a red chair", "sks thing in the snow",
                                                   "sks thing from jsonl", PROMPT]
    pre = DreamBoothDataset(d, PROMPT, 64, prepend_instance_prompt=True)
    assert pre[0]["prompt"] == f"{PROMPT} sks thing on a red chair" and pre[3]["prompt"] == PROMPT
    assert pre.prompts() == sorted({pre[i]["prompt"] for i in range(4)})
    # another extension: .txt files are then not captions (and must not sit among the images)
    (d / "p0.txt").unlink()
    (d / "p1.txt").unlink()
    (d / "p3.caption").write_text("sks thing, captioned")
    assert DreamBoothDataset(d, PROMPT, 64, caption_extension=".caption")[3]["prompt"] == "sks thing, captioned"
    # dropout: about the rate, drawn per (seed, epoch, index), the same on a rebuild
    many = photos(tmp_path / "many", n=40)
    ds = DreamBoothDataset(many, PROMPT, 64, caption_dropout_rate=0.3, seed=1)
    empty = [ds.plan(i)["prompt"] == "" for i in range(40)]
    assert 4 <= sum(empty) <= 20 and "" in ds.prompts()
    assert empty == [DreamBoothDataset(many, PROMPT, 64, caption_dropout_rate=0.3, seed=1).plan(i)["prompt"] == ""
                     for i in range(40)]
    ds.set_epoch(1)
    assert [ds.plan(i)["prompt"] == "" for i in range(40)] != empty


@pytest.mark.parametrize("name, content, message", [
    ("orphan.txt", b"sks thing", r"caption file .*orphan.txt has no image"),
    ("p0.txt", "sks thing caf\u00e9".encode("latin-1"), r"p0.txt is not UTF-8 text \(byte 13"),
    ("p0.txt", b"  \n\n", r"p0.txt is empty"),
])
def test_bad_caption_files_are_named(tmp_path, name, content, message):
    d = photos(tmp_path / "d")
    (d / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        DreamBoothDataset(d, PROMPT, 64)
    with pytest.raises(InputError, match=message):  # the trainer: before any model loads
        train_tiny_sdxl(tmp_path / "out", "--instance_data_dir", str(d), "--instance_prompt", PROMPT)
    assert not (tmp_path / "out" / "loss_log.csv").exists()


def test_trainer_trains_the_captions(tmp_path, monkeypatch):
    import tsd_diffusion.train_sdxl as T

    d = photos(tmp_path / "d")
    for i in range(4):
        (d / f"p{i}.txt").write_text(f"sks thing number {i}")
    prompts = []
    original = T.unet_conditioning

    def recording(condition, batch, device, dtype):
        prompts.extend(batch["prompts"])
        return original(condition, batch, device, dtype)

    monkeypatch.setattr(T, "unet_conditioning", recording)
    train_tiny_sdxl(tmp_path / "out", "--instance_data_dir", str(d), "--instance_prompt", PROMPT,
                    "--prepend_instance_prompt", "--caption_dropout_rate", "0.25", "--method", "lora", steps=8)
    assert set(prompts) <= {""} | {f"{PROMPT} sks thing number {i}" for i in range(4)}
    assert "" in prompts and len(set(prompts)) >= 4


# ---------------------------------------------------------------------------------------------------- masks
def test_masked_loss_matches_a_dense_reference_and_masked_out_pixels_get_no_gradient():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    latents = torch.randn(2, 4, 6, 8)
    pred = torch.randn(2, 4, 6, 8, requires_grad=True)
    mask = torch.ones(2, 1, 6, 8)
    mask[0, :, :, :4] = 0  # left half of sample 0 masked out
    mask[1, :, 2:4] = 0.5

    def unet(noisy, t, embeds, added_cond_kwargs, return_dict):
        return (pred,)

    loss = unet_loss(unet, scheduler, latents, None, None, None, generator=torch.Generator().manual_seed(3),
                     reduce=False, mask=mask)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    dense = torch.stack([sum(mask[b, 0, y, x] * (pred[b, c, y, x] - noise[b, c, y, x]) ** 2
                             for c in range(4) for y in range(6) for x in range(8)) / (4 * 6 * 8) for b in range(2)])
    torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-7)
    loss.sum().backward()
    assert torch.all(pred.grad[0, :, :, :4] == 0) and torch.all(pred.grad[0, :, :, 4:] != 0)
    # area resize to the latent: a pixel block that is all zero stays zero, a half block averages
    pixels = torch.ones(1, 1, 16, 16)
    pixels[..., :8] = 0
    pixels[..., 8:10] = 0.5
    lat = latent_mask(pixels, torch.zeros(1, 4, 4, 4))
    torch.testing.assert_close(lat[0, 0], torch.tensor([[0.0, 0.0, 0.75, 1.0]]).expand(4, 4))


def test_mask_sources_follow_the_image_geometry(tmp_path):
    d = photos(tmp_path / "d", n=3, size=(80, 64))
    mask = Image.new("L", (80, 64), 0)
    mask.paste(255, (40, 0, 80, 64))  # right half kept
    mask.save(d / "p0_mask.png")
    alpha = Image.new("RGBA", (80, 64), (10, 20, 30, 255))
    alpha.putalpha(Image.new("L", (80, 64), 128))
    alpha.save(d / "p1.png")
    md = tmp_path / "masks"
    md.mkdir()
    Image.new("L", (80, 64), 255).save(md / "p2.png")
    ds = DreamBoothDataset(d, PROMPT, 64, masked_loss=True, mask_dir=md, center_crop=True)
    assert len(ds) == 3  # p0_mask.png is not an instance image
    assert {k: (v if isinstance(v, str) else v.name) for k, v in ds.masks.items()} == {
        "p0.png": "p0_mask.png", "p1.png": "alpha", "p2.png": "p2.png"}
    items = [ds[i] for i in range(3)]
    # 80x64 -> 80x64 covers 64x64, centre crop left = 8: the mask's edge at x = 40 lands at x = 32
    m0 = items[0]["mask"][0]
    assert torch.all(m0[:, :31] == 0) and torch.all(m0[:, 33:] == 1)
    torch.testing.assert_close(items[1]["mask"], torch.full((1, 64, 64), 128 / 255))
    assert torch.all(items[2]["mask"] == 1)
    batch = collate(items)
    assert batch["masks"].shape == (3, 1, 64, 64)


@pytest.mark.parametrize("setup, message", [
    ("wrong_size", r"mask .*p0_mask.png is 40x32 \(w x h\) but its image p0.png is 80x64"),
    ("orphan", r"mask .*stray.png in --mask_dir belongs to no image"),
    ("no_flag", "--mask_dir needs --masked_loss"),
])
def test_bad_masks_are_named_before_training(tmp_path, setup, message):
    d = photos(tmp_path / "d")
    md = tmp_path / "masks"
    md.mkdir()
    extra = ["--masked_loss", "--mask_dir", str(md)]
    if setup == "wrong_size":
        Image.new("L", (40, 32), 255).save(d / "p0_mask.png")
    elif setup == "orphan":
        Image.new("L", (80, 64), 255).save(md / "stray.png")
    else:
        extra = ["--mask_dir", str(md)]
    with pytest.raises(InputError, match=message):
        train_tiny_sdxl(tmp_path / "out", "--instance_data_dir", str(d), "--instance_prompt", PROMPT, *extra)
    assert not (tmp_path / "out" / "loss_log.csv").exists()


def test_a_fully_masked_out_subject_trains_nothing(tmp_path):
    """Every mask all zero: the loss is 0 and no LoRA factor gets a gradient (B stays at its zero init); with
    half masks the adapter trains."""
    d = photos(tmp_path / "d", mode="RGBA")
    for i in range(4):
        img = Image.open(d / f"p{i}.png")
        img.putalpha(0)
        img.save(d / f"p{i}.png")
    common = ["--instance_data_dir", str(d), "--instance_prompt", PROMPT, "--masked_loss", "--method", "lora",
              "--learning_rate", "1e-2", "--adam_weight_decay", "0"]
    adapter = train_tiny_sdxl(tmp_path / "zero", *common, steps=3)["adapters"]["unet"]
    assert [r["loss"] for r in read_loss_log(tmp_path / "zero")] == [0.0, 0.0, 0.0]
    for name in adapter.layers:
        B, _ = adapter.lora_factors(name)
        assert torch.count_nonzero(B) == 0
    for i in range(4):
        img = Image.open(d / f"p{i}.png")
        alpha = Image.new("L", img.size, 0)
        alpha.paste(255, (0, 0, img.width // 2, img.height))
        img.putalpha(alpha)
        img.save(d / f"p{i}.png")
    half = train_tiny_sdxl(tmp_path / "half", *common, steps=3)["adapters"]["unet"]
    assert all(r["loss"] > 0 for r in read_loss_log(tmp_path / "half"))
    assert any(torch.count_nonzero(half.lora_factors(n)[0]) for n in half.layers)
