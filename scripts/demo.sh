#!/usr/bin/env bash
# The main job end to end on the embedded synthetic atlas, on CPU (installs into .venv first
# if needed). Output goes to runs/demo (or the directory given as the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
[ -n "${VIRTUAL_ENV:-}" ] || source .venv/bin/activate
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" WANDB_MODE="${WANDB_MODE:-offline}" HF_HUB_OFFLINE=1
clopdit demo --out "${1:-runs/demo}"
