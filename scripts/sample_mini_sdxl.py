"""Write the two sample sets that ship beside the mini SDXL: its replay prior and its reference gallery.

    python scripts/sample_mini_sdxl.py [--weights_dir tsd_diffusion/weights/mini-sdxl] [--output_dir DIR] \
        [--per_class 100]

Both are generations of the shipped base itself (``tsd_diffusion.mini_sdxl.sample_class_set``: the stock
pipeline, 30 Euler steps, one seeded generator per image; ``SAMPLE_SETS`` holds seeds and guidance), so the default
DreamBooth run needs no download and no data set:

- ``replay_prior.safetensors`` (seed 1, unguided): ``--per_class`` images of each CIFAR-10 class, captioned with the
  four pretraining templates; the trainer's default ``--class_data_dir`` (``materialize_replay_prior``);
- ``evaluation/reference_images.safetensors`` (seed 2, guidance 5): ``--per_class`` images of each class for
  ``a photo of a {class}``; the non-subject gallery of ``tsd_diffusion.evaluation.SubjectEvaluator``.

Each file holds uint8 images, int64 labels and, in its metadata, the captions and how it was made (with the shipped
classifier's accuracy on it); the model card (``README.md``) gets a section on them. Deterministic for the weights
and seeds.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from shared.io import atomic_write_text
from tsd_diffusion import evaluation as ev
from tsd_diffusion import mini_sdxl as mini

CARD_SECTION = "## Shipped sample sets"


def write_card_section(card: Path, infos: dict[str, dict]) -> None:
    """Replace the model card's sample-set section (everything from :data:`CARD_SECTION` on)."""
    head = card.read_text().split(CARD_SECTION)[0].rstrip() if card.is_file() else "# mini SDXL"
    rows = [f"| `{file}` | {i['seed']} | {i['guidance']:g} | {i['per_class'] * 10} ({i['per_class']} per class) | "
            f"{'the four pretraining templates' if mini.SAMPLE_SETS[file][1] else 'a photo of a {class}'} | "
            f"{i['classifier_accuracy']:.3f} |" for file, i in infos.items()]
    first = next(iter(infos.values()))
    atomic_write_text(card, f"""{head}

{CARD_SECTION}

Generations of this base itself, written by `scripts/sample_mini_sdxl.py` ({first['date']}, {first['machine']}):
the stock pipeline, {first['inference_steps']} Euler steps, one generator per image seeded `seed * 1000003 + i`;
image i is class i mod 10. The DreamBooth default uses the first as its replay prior (unguided: the base's own
conditional distribution) and the second as the non-subject gallery of its subject metrics (at the pipeline's
default guidance, as validation draws), so it needs no data set and no download.

| file | seed | guidance | images | captions | shipped classifier's accuracy on them |
|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights_dir", type=Path, default=mini.WEIGHTS_DIR, help="the pipeline to sample")
    p.add_argument("--output_dir", type=Path, default=None, help="where the files go (default: --weights_dir)")
    p.add_argument("--per_class", type=int, default=100)
    p.add_argument("--batch_size", type=int, default=100)
    args = p.parse_args(argv)
    out = args.output_dir or args.weights_dir
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(args.weights_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    classifier = ev.load_classifier(args.weights_dir / mini.EVALUATION_DIR)
    infos = {}
    for file, (seed, templates, guidance) in mini.SAMPLE_SETS.items():
        t0 = time.time()
        images, labels, captions = mini.sample_class_set(pipe, args.per_class, seed, templates=templates,
                                                         guidance=guidance, batch_size=args.batch_size)
        accuracy = ev.class_accuracy(classifier, mini.to_tensor(images), torch.from_numpy(labels))
        info = {"seed": seed, "per_class": args.per_class, "guidance": guidance,
                "inference_steps": mini.SAMPLE_STEPS, "classifier_accuracy": round(accuracy, 4),
                "wall_s": round(time.time() - t0, 1),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                "date": time.strftime("%Y-%m-%d")}
        mini.save_class_set(out / file, images, labels, captions, **info)
        infos[file] = info
        print(f"wrote {out / file}: {len(images)} images, {info}")
    write_card_section(out / "README.md", infos)


if __name__ == "__main__":
    main()
