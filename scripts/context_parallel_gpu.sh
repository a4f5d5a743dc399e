#!/usr/bin/env bash
# One device call for context parallelism (issue #20): the flash varlen kernel with separate query / key ranges
# (each CP rank's chunks against their sequences' prefixes) against the float64 reference, and on a 2-GPU kind
# CP=2 against CP=1 on NCCL in bf16 (log-probs, loss, grad norm, log-probs after one step). Logs in $OUT.
#   run(kind="nvidia-h100-x1", carry=[".whl", ".fi_cache"], timeout_s=300, command="bash scripts/context_parallel_gpu.sh")
#   run(kind="nvidia-h100-x2", carry=[".whl", ".fi_cache"], timeout_s=400, command="bash scripts/context_parallel_gpu.sh")
set -u
OUT=${OUT:-/tmp/kiln_context_parallel}
mkdir -p "$OUT"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
timeout -s INT -k 15 360 python3 -m pytest -m gpu tests/test_context_parallel.py -q -p no:cacheprovider -rs 2>&1 | tail -15 \
  | tee "$OUT/pytest.log"
