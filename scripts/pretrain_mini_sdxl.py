"""Pretrain the mini SDXL base on CIFAR-10 on a CPU: ``python scripts/pretrain_mini_sdxl.py --cifar_task_json PATH
--output_dir DIR`` (a command line over :mod:`tsd_diffusion.pretrain_mini`, whose docstring says what data it needs
and where that data can still be had)."""

from tsd_diffusion.pretrain_mini import main

if __name__ == "__main__":
    main()
