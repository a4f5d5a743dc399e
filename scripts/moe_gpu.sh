#!/usr/bin/env bash
# One device call for Qwen3-MoE in the engine (issue #21): the MoE GPU tests (fused kernel vs the torch reference in
# bf16 and fp32, CUDA-graph decode vs eager and vs HF's routing), then benchmarks/moe_engine.py on the Qwen3-30B-A3B
# shape (all 48 layers on a card of 100 GiB or more, else 24: the model row says which). Logs and JSON go to $OUT.
#   run(command="bash scripts/moe_gpu.sh", carry=[".whl", ".fi_cache"])
# BENCH_ARGS adds benchmark arguments (e.g. "--layers 24 --offline ''"); SKIP_TESTS=1 / SKIP_BENCH=1 skip a part.
# FP8=1: FP8 experts (issue #22 on MoE) instead, in one call of its own: the FP8 MoE GPU tests (tests/test_fp8_moe.py:
# the FP8 fused kernel vs the CPU specification, CUDA-graph replay, FP8 engine graphs vs eager vs the CPU engine),
# then the benchmark with --rollout-dtype bf16,fp8 (a bf16 and an FP8 engine on the same random weights, the FP8
# layer beside the bf16 one in the layer rows, decode rows of both and fp8 / bf16 ratios; no offline row):
#   run(command="FP8=1 bash scripts/moe_gpu.sh", carry=[".whl", ".fi_cache"], timeout_s=600)
set -u
OUT=${OUT:-/tmp/kiln_moe_gpu}
mkdir -p "$OUT"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

TEST_FILE=tests/test_engine_moe.py
FP8_ARGS=()
if [ "${FP8:-0}" = 1 ]; then
  TEST_FILE=tests/test_fp8_moe.py
  FP8_ARGS=(--rollout-dtype bf16,fp8 --offline "")
fi

tests_rc=skipped
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout -s INT -k 15 "${TEST_TIMEOUT:-240}" python3 -m pytest -m gpu "$TEST_FILE" -q -p no:cacheprovider -rs --durations=5 2>&1 \
    | tee "$OUT/pytest_moe.log"
  tests_rc=${PIPESTATUS[0]}
fi

bench_rc=skipped
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-330}" python3 -m benchmarks.moe_engine --out "$OUT/moe_engine.json" "${FP8_ARGS[@]}" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_moe.log"
  bench_rc=${PIPESTATUS[0]}
fi

echo
echo "== summary =="
echo "pytest -m gpu $TEST_FILE: rc=$tests_rc $(grep -E '[0-9]+ (passed|failed)' "$OUT/pytest_moe.log" 2>/dev/null | tail -1)"
echo "benchmarks.moe_engine: rc=$bench_rc"
grep '^|' "$OUT/bench_moe.log" 2>/dev/null
