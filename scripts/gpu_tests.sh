#!/usr/bin/env bash
# The whole GPU test suite in one device call: `pytest -m gpu` over every test file, logs under $OUT.
#   run(command="bash scripts/gpu_tests.sh", carry=[".whl", ".fi_cache"]); afterwards copy $OUT/flashinfer_cache.tar.gz into .fi_cache/
set -u
OUT=${OUT:-/tmp/kiln_gpu_tests}
mkdir -p "$OUT"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
timeout -s INT -k 15 "${TEST_TIMEOUT:-420}" python3 -m pytest -m gpu tests/ -q -p no:cacheprovider -rfEs --durations=10 "$@" 2>&1 \
  | tee "$OUT/pytest_gpu.log"
echo "pytest -m gpu: rc=${PIPESTATUS[0]}"
tar czf "$OUT/flashinfer_cache.tar.gz" -C ~/.cache flashinfer 2>/dev/null   # keep as .fi_cache/ for next time
