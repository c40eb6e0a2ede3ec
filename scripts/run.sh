#!/usr/bin/env bash
# The main job: set up .venv (idempotent) and run it. Until the SDXL trainer lands this is the core demo.
#   bash scripts/run.sh [args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
python scripts/demo.py "$@"
