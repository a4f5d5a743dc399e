#!/usr/bin/env bash
# One device call after the first full `pytest -m gpu` run (2026-12-06, H100: 44 failed): the diagnosis script, the
# 0.6B RL step with the KV pool's memory saver (graphs kept across the colocated hand-over), then the GPU tests that
# failed, with whatever time is left.  run(carry=[".whl", ".fi_cache"], command="bash scripts/triage_gpu.sh")
set -u
OUT=${OUT:-/tmp/kiln_triage}
mkdir -p "$OUT"
source scripts/device_env.sh
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
timeout "${T_DIAG:-120}" python3 scripts/gpu_diag.py 2>&1 | grep -v -i warn | tee "$OUT/diag.txt"
if [ "${SKIP_RL:-0}" != 1 ]; then
  timeout "${T06:-220}" python3 -m benchmarks.rl_step --shape qwen3-0.6b --steps "${STEPS_06:-2}" \
    --model-dir /tmp/kiln_models/qwen3-0.6b --out "$OUT/rl_step_qwen3-0.6b.json" 2>&1 | tail -40 \
    | tee "$OUT/rl_step_qwen3-0.6b.log"
  ray stop --force >/dev/null 2>&1
fi
left=$(( ${LIMIT_S:-580} - SECONDS - 10 ))
[ "$left" -lt 30 ] && { echo "triage: no time left for the tests ($SECONDS s)"; exit 0; }
timeout -s INT -k 15 "$left" python3 -m pytest -m gpu -q -p no:cacheprovider -rfEs tests/test_engine_gpu.py tests/test_kv_pool.py \
  tests/test_engine_moe.py tests/test_fp8_moe.py tests/test_trainer_moe.py tests/test_fp8_gpu.py tests/test_rl_step.py \
  -k "release or vmm or moe or fp8 or silu or gemm or activation or colocated" > "$OUT/pytest.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | cut -c1-300
echo "triage: $SECONDS s"
