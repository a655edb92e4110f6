#!/usr/bin/env bash
# Install clopdit-dist and its test dependencies into the active Python environment.
# Order matters (see README "Install"): torch pinned to the CPU build first, so nothing
# later pulls a CUDA build; DeepSpeed without build isolation so it sees that torch.
set -euo pipefail
python -m pip install --upgrade pip wheel setuptools
python -m pip install "torch==2.13.0"
python -m pip install --no-build-isolation "deepspeed==0.19.8"
python -m pip install -e ".[dev]"
# wandb[sweeps] pins numpy<2; the sweeps engine itself runs fine with numpy 2.
python -m pip install --no-deps "sweeps"
