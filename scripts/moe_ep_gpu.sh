#!/usr/bin/env bash
# One 2-GPU device call for expert parallelism in the engine (issue #21): the fused MoE kernel's expert-parallel path
# (fp32 and bf16) against the torch reference, then an EP=2 engine (NCCL, CUDA graphs, fp32) fed a weight push and
# checked against TP=1 (greedy tokens, log-probs, routed experts, every expert gathered back equal to the pushed one).
#   run(kind="nvidia-h100-x2", timeout_s=300, carry=[".whl", ".fi_cache"], command="bash scripts/moe_ep_gpu.sh")
# The test skips itself on fewer than 2 GPUs (the summary then says "skipped").
set -u
OUT=${OUT:-/tmp/kiln_moe_ep_gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # no NVLink multicast, ever
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
timeout -s INT -k 15 "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu tests/test_engine_moe_ep.py -q -rs -p no:cacheprovider 2>&1 \
  | tee "$OUT/pytest_moe_ep.log"
rc=${PIPESTATUS[0]}
echo
echo "== summary =="
echo "pytest -m gpu tests/test_engine_moe_ep.py: rc=$rc $(grep -E '[0-9]+ (passed|failed|skipped)' "$OUT/pytest_moe_ep.log" | tail -1)"
