#!/usr/bin/env bash
# One device call: install the carried wheels, run the engine's GPU tests, run the throughput benchmark,
# keep flashinfer's JIT cache for next time, print a short table last. Logs go to $OUT.
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".fi_cache"])
# BENCH_ARGS overrides the benchmark's arguments (BENCH_TIMEOUT its time limit, default 240 s; LOG_TAG names its log
# bench$LOG_TAG.log, so several shapes can run in one call); SKIP_TESTS=1 skips pytest, SKIP_BENCH=1 the benchmark.
set -u
OUT=${OUT:-/tmp/kiln_gpu_check}
mkdir -p "$OUT"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers, flashinfer; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'flashinfer', flashinfer.__version__)" | tee -a "$OUT/device.txt"

tests_rc=skipped
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 330 python3 -m pytest -m gpu tests/test_engine_gpu.py tests/test_cuda_graph.py tests/test_ops.py -q -p no:cacheprovider \
    2>&1 | tee "$OUT/pytest.log"
  tests_rc=${PIPESTATUS[0]}
fi

bench_rc=skipped
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-240}" python3 -m benchmarks.engine_throughput ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench${LOG_TAG:-}.log"
  bench_rc=${PIPESTATUS[0]}
fi

tar czf "$OUT/flashinfer_cache.tar.gz" -C ~/.cache flashinfer 2>/dev/null
echo
echo "== summary =="
echo "pytest -m gpu: rc=$tests_rc $(grep -E '[0-9]+ (passed|failed)' "$OUT/pytest.log" 2>/dev/null | tail -1)"
echo "benchmark: rc=$bench_rc"
grep '^|' "$OUT/bench${LOG_TAG:-}.log" 2>/dev/null
