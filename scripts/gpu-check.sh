#!/usr/bin/env bash
# The prepared GPU check (under 8 minutes on one GPU): ViT-L/14 Iso-CTS and TSV-M merges on
# --device cuda in float32 and float64 against a CPU float64 reference, then the tiny bench on
# GPU actors; prints one table and exits non-zero on any failure. See benchmarks/README.md.
# Options go to benchmarks/gpu_check.py (--dry-run-cpu runs it all on CPU, small).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python benchmarks/gpu_check.py "$@"
