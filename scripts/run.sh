#!/usr/bin/env bash
# The main job: set up .venv (idempotent), then `accelerate launch apps/train_sdxl.py` (flags pass through).
# With no flags it trains LoRA-Dash on the embedded tiny SDXL and subject (~2 minutes on 2 CPU cores).
#   bash scripts/run.sh [train_sdxl.py flags...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
exec accelerate launch --quiet --num_processes 1 --num_machines 1 --dynamo_backend no apps/train_sdxl.py "$@"
