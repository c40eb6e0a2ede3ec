"""Fine-tune a text model with LoRA, LoRA-Dash, LoRA-TSD, EVA, LoRA-DA, PiSSA or LoRA-GA.

    accelerate launch apps/train_text.py --model_name_or_path DIR --task {causal-mc,classification} \\
        --train_file F (--eval_file F | --eval_split N) --method dash --target_modules q_proj,v_proj --output_dir OUT

See ``tsd_text/train.py`` for the arguments, the outputs and multi-process launching.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: shared/, tsd_text/

from tsd_common.launch import run_cli  # noqa: E402
from tsd_text.train import main, parse_args  # noqa: E402

if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
