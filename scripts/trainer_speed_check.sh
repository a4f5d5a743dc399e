#!/usr/bin/env bash
# One device call for the trainer step: the trainer of commit $BASE (before) and of the working tree (after) timed by
# the same benchmark script side by side, a profile of the after step, the trainer's GPU tests, then (if time is
# left) the 8B shape. Logs in $OUT, JSON rows last.
#   run(kind="nvidia-h100-x1", carry=[".whl", ".fi_cache"], timeout_s=360,
#       command="source scripts/device_env.sh; BASE=e859522 LIMIT_S=350 bash scripts/trainer_speed_check.sh")
# LIMIT_S: the call's time limit (the GPU tests are cut to fit it); BIG_AFTER_S / BUDGET_S: when the 8B row runs.
set -u
OUT=${OUT:-/tmp/kiln_trainer_check}
mkdir -p "$OUT"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
ARGS="--shape qwen3-0.6b --tokens 16384 --no-local"
if [ -n "${BASE:-}" ]; then  # the old trainer, measured by this tree's benchmark script
  rm -rf /tmp/base && mkdir -p /tmp/base && git archive "$BASE" | tar -x -C /tmp/base
  cp benchmarks/train_step.py /tmp/base/benchmarks/train_step.py
  (cd /tmp/base && timeout 120 python3 -m benchmarks.train_step $ARGS) 2>&1 | grep -v -i warn | tee "$OUT/before.log"
fi
timeout 150 python3 -m benchmarks.train_step $ARGS --profile-steps 1 --out "$OUT" 2>&1 | grep -v -i warn \
  | tee "$OUT/after.log"
left=$(( ${LIMIT_S:-350} - SECONDS - 10 ))  # the tests get what the call's limit leaves, at most 200 s
timeout -s INT -k 15 $(( left < 200 ? left : 200 )) python3 -m pytest -m gpu tests/test_trainer_gpu.py tests/test_packed_attention.py \
  tests/test_chunked_logprobs.py tests/test_trainer_fused.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
if [ "$SECONDS" -lt "${BIG_AFTER_S:-190}" ]; then
  timeout $((${BUDGET_S:-280} - SECONDS)) python3 -m benchmarks.train_step --shape qwen3-8b --tokens 16384 \
    --recompute full --no-optimizer --no-local --steps 1 2>&1 | grep -v -i warn | tee "$OUT/after_8b.log"
fi
echo "== summary ($SECONDS s) =="
grep -h '^{' "$OUT"/before.log "$OUT"/after.log "$OUT"/after_8b.log 2>/dev/null
grep -E '[0-9]+ (passed|failed)' "$OUT/pytest.log" | tail -1
