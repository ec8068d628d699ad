#!/usr/bin/env bash
# Second README command: set up .venv with the test extras, check the code statically (ruff,
# mypy, the one-way layer contract), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check pipeline
.venv/bin/mypy pipeline
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
