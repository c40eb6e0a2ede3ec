"""SDXL DreamBooth LoRA / LoRA-Dash training: ``accelerate launch apps/train_sdxl.py [flags]``.

The flags mirror diffusers' ``train_dreambooth_lora_sdxl.py``; ``--help`` lists them. With no flags it trains
LoRA-Dash on the shipped mini SDXL and a subject the project draws itself (about 4 minutes on 2 CPU cores).
The same command is installed as ``tsd-train-sdxl``; the trainer is ``tsd_diffusion.train_sdxl``.
"""

from tsd_diffusion.train_sdxl import cli

if __name__ == "__main__":
    cli()
