"""SDXL DreamBooth LoRA / LoRA-Dash training: ``accelerate launch apps/train_sdxl.py [flags]``.

The flags mirror diffusers' ``train_dreambooth_lora_sdxl.py``; ``--help`` lists them. With no flags it trains
LoRA-Dash on the shipped mini SDXL and a subject the project draws itself (about 4 minutes on 2 CPU cores).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tsd_common.launch import run_cli  # noqa: E402
from tsd_diffusion.train_sdxl import main, parse_args  # noqa: E402


def cli() -> None:
    summary = main(parse_args())
    if summary.get("validation_images"):
        print(f"done: {summary['steps']} steps; adapter, validation images and reports in {summary['output_dir']}/")


if __name__ == "__main__":
    run_cli(cli)
