"""Compare SDXL LoRA adapters side by side in a Gradio app (LoRA vs LoRA-Dash, plus a no-adapter baseline).

    python apps/compare.py --base MODEL --adapter lora=DIR --adapter dash=DIR [--adapter name=DIR ...]

With no arguments: the two most recently trained adapters under ``outputs/`` (``--adapters_root``) on the base
they were trained on (the shipped mini SDXL for ``accelerate launch apps/train_sdxl.py``'s default). Serves on
127.0.0.1:7860 unless ``--host``/``--port`` say otherwise; no share link unless ``--share``. The same command is
installed as ``tsd-compare``; the app is ``tsd_diffusion.compare``.
"""

from tsd_diffusion.compare import cli

if __name__ == "__main__":
    cli()
