#!/usr/bin/env bash
# First README command: set up .venv, then merge the built-in example on an embedded Ray.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pipeline demo "$@"
