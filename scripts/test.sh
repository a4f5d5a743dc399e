#!/usr/bin/env bash
# Set up (idempotent) and run the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false WANDB_MODE=offline RAY_AUTH_MODE=disabled
.venv/bin/ruff check .   # the house lint (pyproject.toml [tool.ruff]): line length, syntax, unused imports
exec .venv/bin/python -m pytest -q -x --durations=15 "$@"
