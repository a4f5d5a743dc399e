#!/usr/bin/env bash
# Create .venv and install Kiln with its test extra. On a machine without CUDA, torch
# comes from the CPU build on local disk (torch==2.13.0) before the project, so that pip
# does not pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then .venv/bin/pip install -q torch; else .venv/bin/pip install -q torch==2.13.0; fi
fi
.venv/bin/pip install -q -e '.[test]'
