#!/usr/bin/env bash
# Create .venv at the repository root and install the project into it.
# torch: the pinned CPU build (torch==2.13.0) unless the venv already has a torch, so a user
# who put a CUDA build there keeps it. Override the pin with TORCH_SPEC=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VENV_PY=.venv/bin/python
if ! "$VENV_PY" -c "import torch" >/dev/null 2>&1; then
  "$VENV_PY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
extras="${1:-}"
stamp=".venv/.installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV_PY" -m pip install --quiet -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
