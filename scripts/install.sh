#!/usr/bin/env bash
# Create .venv (unless a virtualenv is already active) and install clopdit-dist with its test
# dependencies. Idempotent: a second run with an unchanged pyproject.toml does nothing.
#
# Order matters: torch is pinned to the 2.13.0 CPU wheel first (an unpinned torch pulls a
# multi-GB CUDA build), then DeepSpeed is built without isolation so it sees that torch.
# On a GPU machine, install the CUDA torch you want first; the rest is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
stamp="$VIRTUAL_ENV/.clopdit-installed"
want="$(sha256sum pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip wheel setuptools
python -m pip install -q "torch==2.13.0"
python -c "import deepspeed" 2>/dev/null || python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
python -m pip install -q -e ".[dev]"
# `clopdit sweep` uses W&B's search code, the `sweeps` package. It pins numpy<2 (this project
# runs numpy 2), so it cannot be a pyproject dependency: install it without its dependencies,
# plus the two it imports that the environment lacks (neither pins numpy). Its numpy/scipy/
# scikit-learn/pydantic/PyYAML needs are met by the versions already installed.
python -m pip install -q --no-deps "sweeps==0.3.0"
python -m pip install -q "jsonschema>=3.2" "jsonref>=1.0"
echo "$want" > "$stamp"
