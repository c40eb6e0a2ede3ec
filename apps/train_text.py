"""Fine-tune a text model with LoRA, LoRA-Dash, LoRA-TSD, EVA, LoRA-DA, PiSSA or LoRA-GA.

    accelerate launch apps/train_text.py --model_name_or_path DIR --task {causal-mc,classification} \\
        --train_file F (--eval_file F | --eval_split N) --method dash --target_modules q_proj,v_proj --output_dir OUT

The same command is installed as ``tsd-train-text``. See ``tsd_text/train.py`` for the arguments, the outputs and
multi-process launching.
"""

from tsd_text.train import cli

if __name__ == "__main__":
    cli()
