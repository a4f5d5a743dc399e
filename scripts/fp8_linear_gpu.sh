#!/usr/bin/env bash
# FP8 linears kernel by kernel (issue #22: FP8 decode slower than bf16): the GEMV and linear kernels' GPU tests, then
# benchmarks/fp8_linear.py on the Qwen3-8B linears (rows 1: the engine's bf16 GEMV vs the FP8 GEMV over a config
# sweep vs quantize_activation + gemv_prequant over the same sweep; rows 64 / 256: bf16 vs quantize_activation +
# torch._scaled_mm vs + the triton GEMM over a config sweep); the tables last. Logs and fp8_linear.json go to $OUT.
# One device call (about 4 minutes: the swept kernels are built in 8 processes first):
#   bash scripts/device_wheels.sh engine   # (here, once) the engine-only wheels: no ray or megatron needed
#   run(command="mv .whl_engine .whl; bash scripts/fp8_linear_gpu.sh", carry=[".whl_engine"], timeout_s=480)
# SKIP_TESTS=1 skips the tests; BENCH_ARGS replaces the benchmark's arguments (BENCH_TIMEOUT its limit, default 360 s;
# on the limit it prints the tables of what it measured), e.g. a short call:
#   run(command="mv .whl_engine .whl; SKIP_TESTS=1 BENCH_ARGS='--rows 1 --shapes o,down --block-n 4,8,16' bash scripts/fp8_linear_gpu.sh",
#       carry=[".whl_engine"], timeout_s=300)
set -u
OUT=${OUT:-/tmp/kiln_fp8_linear}
mkdir -p "$OUT"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

tests_rc=skipped
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout -s INT -k 15 "${TEST_TIMEOUT:-90}" python3 -m pytest -m gpu tests/test_fp8_gpu.py -k "prequant or gemv or linear or silu" -q \
    -p no:cacheprovider -rs --durations=5 2>&1 | tee "$OUT/pytest_fp8_linear.log"
  tests_rc=${PIPESTATUS[0]}
fi

timeout -s INT -k 30 "${BENCH_TIMEOUT:-360}" python3 -m benchmarks.fp8_linear ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench_fp8_linear.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "== $(cat "$OUT/device.txt" | tr '\n' ' ')"
echo "== pytest -m gpu tests/test_fp8_gpu.py (the GEMV and linear kernels): rc=$tests_rc; $(tail -n 1 "$OUT/pytest_fp8_linear.log" 2>/dev/null)"
echo "== benchmarks.fp8_linear (rc=$bench_rc):"
grep -E "^(\| |#|fastest|\(predicted|!!)" "$OUT/bench_fp8_linear.log" 2>/dev/null
