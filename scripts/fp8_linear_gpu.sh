#!/usr/bin/env bash
# FP8 linears kernel by kernel, then the engine with the fastest ones (issue #22: FP8 decode slower than bf16), in one
# device call: the GEMV and linear kernels' GPU tests; benchmarks/fp8_linear.py on the Qwen3-8B linears (rows 1: the
# engine's bf16 GEMV vs the FP8 GEMV over a config sweep vs quantize_activation + gemv_prequant over the same sweep
# vs the tensor-core kernels with the row padded to 16 (scaled_mm, the triton GEMM); rows 64 / 256: bf16 vs quantize_activation + torch._scaled_mm vs + the triton GEMM over a config sweep), which
# writes the fastest correct kernel per shape and row count to $OUT/fp8_kernel_configs.json; then the 8B-shape
# engine's decode (batch 1 / 64 / 256, triton attention, CUDA graphs) with bf16 weights, FP8 with the built-in
# kernels and FP8 with those tuned kernels (--fp8-kernel-configs), side by side. Logs and JSON go to $OUT.
#   bash scripts/device_wheels.sh engine   # (here, once) the engine-only wheels: no ray or megatron needed
#   run(command="mv .whl_engine .whl; bash scripts/fp8_linear_gpu.sh", carry=[".whl_engine"], timeout_s=600)
# SKIP_TESTS=1 skips the tests, SKIP_DECODE=1 the engine rows; BENCH_ARGS replaces the benchmark's arguments
# (BENCH_TIMEOUT its limit, default 330 s; on the limit it prints the tables of what it measured), e.g. a short call:
#   run(command="mv .whl_engine .whl; SKIP_TESTS=1 SKIP_DECODE=1 BENCH_ARGS='--rows 1 --shapes o,down --block-n 4,8,16' bash scripts/fp8_linear_gpu.sh",
#       carry=[".whl_engine"], timeout_s=300)
# CONFIGS=path uses a tuned-kernels JSON from an earlier call for the engine rows instead of this call's sweep.
set -u
OUT=${OUT:-/tmp/kiln_fp8_linear}
mkdir -p "$OUT"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

tests_rc=skipped
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout -s INT -k 15 "${TEST_TIMEOUT:-90}" python3 -m pytest -m gpu tests/test_fp8_gpu.py -k "prequant or gemv or linear or silu or pdl" -q \
    -p no:cacheprovider -rs --durations=5 2>&1 | tee "$OUT/pytest_fp8_linear.log"
  tests_rc=${PIPESTATUS[0]}
fi

configs=${CONFIGS:-$OUT/fp8_kernel_configs.json}
bench_rc=skipped
if [ -z "${CONFIGS:-}" ]; then
  timeout -s INT -k 30 "${BENCH_TIMEOUT:-330}" python3 -m benchmarks.fp8_linear --write-configs "$configs" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_fp8_linear.log"
  bench_rc=${PIPESTATUS[0]}
fi

decode_rc=skipped
if [ "${SKIP_DECODE:-0}" != 1 ] && [ -f "$configs" ]; then
  timeout -s INT -k 20 $(( ${CALL_LIMIT:-585} - SECONDS )) python3 -m benchmarks.engine_throughput --shape qwen3-8b \
    --rollout-dtype bf16,fp8,fp8-tuned --fp8-kernel-configs "$configs" --decode-batches 1,64,256 --decode-steps 64 \
    --offline= --grpo= --hf-batches= --overlap on --backend triton 2>&1 | tee "$OUT/bench_fp8_decode.log"
  decode_rc=${PIPESTATUS[0]}
fi

echo
echo "== $(cat "$OUT/device.txt" | tr '\n' ' ')"
echo "== pytest -m gpu tests/test_fp8_gpu.py (the GEMV and linear kernels): rc=$tests_rc; $(tail -n 1 "$OUT/pytest_fp8_linear.log" 2>/dev/null)"
echo "== benchmarks.fp8_linear (rc=$bench_rc):"
grep -E "^(\| |#|fastest|\(predicted|!!|tuned)" "$OUT/bench_fp8_linear.log" 2>/dev/null
echo "== engine decode, bf16 vs fp8 vs fp8 with the tuned kernels (rc=$decode_rc):"
grep "^| " "$OUT/bench_fp8_decode.log" 2>/dev/null
grep -h "fp8 weights:" "$OUT/bench_fp8_decode.log" 2>/dev/null | head -n 2
