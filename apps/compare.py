"""Compare SDXL LoRA adapters side by side in a Gradio app (LoRA vs LoRA-Dash, plus a no-adapter baseline).

    python apps/compare.py --base MODEL --adapter lora=DIR --adapter dash=DIR [--adapter name=DIR ...]

With no arguments: the two most recently trained adapters under ``outputs/`` (``--adapters_root``) on the base
they were trained on (the shipped mini SDXL for ``accelerate launch apps/train_sdxl.py``'s default). Serves on 127.0.0.1:7860 unless ``--host``/``--port`` say otherwise; no share link
unless ``--share``. The app itself is ``tsd_diffusion.compare``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tsd_diffusion import compare  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None,
                   help="hub id or local SDXL pipeline dir (default: the adapters' own base, else tsd-lora/mini-sdxl)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a trainer output dir (with pytorch_lora_weights.safetensors); repeat for more")
    p.add_argument("--adapters_root", default=compare.DEFAULT_ADAPTERS_ROOT,
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        adapters = compare.resolve_adapters(args.adapter, args.adapters_root)
    except ValueError as e:
        sys.exit(f"apps/compare.py: {e}")
    app = compare.CompareApp(args.base or compare.default_base(adapters), adapters, save_dir=args.save_dir or Path(args.adapters_root) / "compare",
                             device=args.device, steps=args.steps, guidance=args.guidance, batch_size=args.batch_size)
    print(app.status_markdown())
    compare.launch(compare.build_app(app), host=args.host, port=args.port, share=args.share)


if __name__ == "__main__":
    main()
