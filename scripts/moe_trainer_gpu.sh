#!/usr/bin/env bash
# One device call for Qwen3-MoE in the trainer (issue #21): the trainer's MoE GPU test, the reduced-layer
# Qwen3-30B-A3B trainer step (routing replay off / on), then the routing-replay mismatch figure (engine vs trainer
# log-probs on one bf16 batch, replay off vs on; target: mean |dlogp| >= 5x lower with replay). Logs and JSON in $OUT.
#   run(command="bash scripts/moe_trainer_gpu.sh", carry=[".whl", ".fi_cache"])
# LAYERS: trainer-step layers (default 4 on a card under 100 GiB, else 8); MISMATCH_ARGS / STEP_ARGS add arguments;
# SKIP_TESTS=1 / SKIP_STEP=1 / SKIP_MISMATCH=1 skip a part.
set -u
OUT=${OUT:-/tmp/kiln_moe_trainer_gpu}
mkdir -p "$OUT"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
LAYERS=${LAYERS:-$([ "${mem_mib:-0}" -ge 100000 ] && echo 8 || echo 4)}

tests_rc=skipped
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout -s INT -k 15 "${TEST_TIMEOUT:-120}" python3 -m pytest -m gpu tests/test_trainer_moe.py -q -p no:cacheprovider 2>&1 \
    | tee "$OUT/pytest_moe_trainer.log"
  tests_rc=${PIPESTATUS[0]}
fi

step_rc=skipped
if [ "${SKIP_STEP:-0}" != 1 ]; then
  timeout "${STEP_TIMEOUT:-240}" python3 -m benchmarks.moe_train_step --layers "$LAYERS" \
    --out "$OUT/moe_train_step.json" ${STEP_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/moe_train_step.log"
  step_rc=${PIPESTATUS[0]}
fi

mismatch_rc=skipped
if [ "${SKIP_MISMATCH:-0}" != 1 ]; then
  timeout "${MISMATCH_TIMEOUT:-200}" python3 -m benchmarks.moe_replay_mismatch --out "$OUT/moe_replay_mismatch.json" \
    ${MISMATCH_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/moe_replay_mismatch.log"
  mismatch_rc=${PIPESTATUS[0]}
fi

echo
echo "== summary =="
echo "pytest -m gpu tests/test_trainer_moe.py: rc=$tests_rc $(grep -E '[0-9]+ (passed|failed)' \
  "$OUT/pytest_moe_trainer.log" 2>/dev/null | tail -1)"
echo "benchmarks.moe_train_step (layers $LAYERS): rc=$step_rc"
grep -h '^{' "$OUT/moe_train_step.log" 2>/dev/null
echo "benchmarks.moe_replay_mismatch: rc=$mismatch_rc"
grep -h '^|\|^ratio' "$OUT/moe_replay_mismatch.log" 2>/dev/null
