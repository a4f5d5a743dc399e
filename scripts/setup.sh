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
# The python tool's sandbox (envs/python_executor.py) needs bubblewrap, else util-linux unshare: install bwrap
# when it is missing and we are root with apt-get; never fail the setup for it (its tests then skip with the reason).
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq bubblewrap >/dev/null 2>&1; then
    { apt-get update -qq && apt-get install -y -qq bubblewrap; } >/dev/null 2>&1 \
      || echo "setup.sh: could not install bubblewrap; the python tool sandbox falls back to unshare or refuses" >&2
  fi
fi
