#!/usr/bin/env bash
# One device call: install the carried wheels, run the engine's GPU tests, run the throughput benchmark,
# keep flashinfer's JIT cache for next time, print a short table last. Logs go to $OUT.
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".fi_cache"])
# BENCH_ARGS overrides the benchmark's arguments (BENCH_TIMEOUT its time limit, default 240 s; LOG_TAG names its log
# bench$LOG_TAG.log, so several shapes can run in one call); SKIP_TESTS=1 skips pytest, SKIP_BENCH=1 the benchmark.
# BASE=<commit> first runs this tree's benchmark script against the engine of that commit (BASE_ARGS, default
# BENCH_ARGS; log bench_before$LOG_TAG.log), side by side with the working tree's; pass --model-dir in both so the
# random model is built once.
set -u
OUT=${OUT:-/tmp/kiln_gpu_check}
mkdir -p "$OUT"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers, flashinfer; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'flashinfer', flashinfer.__version__)" | tee -a "$OUT/device.txt"

tests_rc=skipped
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout -s INT -k 15 "${TEST_TIMEOUT:-330}" python3 -m pytest -m gpu tests/test_engine_gpu.py tests/test_ops.py \
    -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
  tests_rc=${PIPESTATUS[0]}
fi

before_rc=skipped
if [ -n "${BASE:-}" ] && [ "${SKIP_BENCH:-0}" != 1 ]; then  # the engine of $BASE, timed by this tree's script
  rm -rf /tmp/kiln_base && mkdir -p /tmp/kiln_base
  if git cat-file -e "$BASE^{commit}" 2>/dev/null && git archive "$BASE" | tar -x -C /tmp/kiln_base; then
    cp benchmarks/engine_throughput.py /tmp/kiln_base/benchmarks/engine_throughput.py
    # PYTHONPATH (device_env.sh) names this tree: the base tree must come first
    (cd /tmp/kiln_base && PYTHONPATH=/tmp/kiln_base:$PYTHONPATH timeout "${BASE_TIMEOUT:-${BENCH_TIMEOUT:-240}}" \
      python3 -m benchmarks.engine_throughput ${BASE_ARGS:-${BENCH_ARGS:-}}) 2>&1 | tee "$OUT/bench_before${LOG_TAG:-}.log"
    before_rc=${PIPESTATUS[0]}
    grep -q "^/tmp/kiln_base/inference_engine" <(cd /tmp/kiln_base && PYTHONPATH=/tmp/kiln_base:$PYTHONPATH \
      python3 -c "import inference_engine; print(inference_engine.__file__)") || before_rc="wrong-tree"
  else
    echo "BASE $BASE is not a commit of this copy's git history: no before run" | tee "$OUT/bench_before${LOG_TAG:-}.log"
    before_rc=no-base
  fi
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
if [ "$before_rc" != skipped ]; then
  echo "benchmark of $BASE (before): rc=$before_rc"
  grep '^|' "$OUT/bench_before${LOG_TAG:-}.log" 2>/dev/null
fi
echo "benchmark: rc=$bench_rc"
grep '^|' "$OUT/bench${LOG_TAG:-}.log" 2>/dev/null
