#!/usr/bin/env bash
# The README's main command: set up .venv (idempotent), then run the quickstart on CPU with a local Ray:
# a tiny model warmed up by SFT, then GRPO with train.py; metrics, checkpoints and the reward curve go to
# runs/quickstart/. Extra arguments are passed on to train.py (e.g. --num-rollout 20).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec ./examples/quickstart/run.sh "$@"
