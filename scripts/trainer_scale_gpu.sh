#!/usr/bin/env bash
# One device call for issue #20 (trainer at scale) on one GPU: the GPU test of the offloaded optimizer (offloaded
# step == resident, bit for bit), the replicated / sharded / offloaded optimizers side by side on the Qwen3-0.6B
# shape (memory per phase, step time), then the Qwen3-8B shape (random bf16 weights built on the device) trained
# for 2 steps with --optimizer-cpu-offload: tokens/s and peak memory. Logs and JSON rows in $OUT.
#   run(kind="nvidia-h100-x1", carry=[".whl", ".fi_cache"], timeout_s=600,
#       command="bash scripts/trainer_scale_gpu.sh")
# The 8B row needs ~92 GiB of host memory for the page-locked optimizer state (3 x 4 bytes x 8.2e9).
# With DP=2 (on a 2-GPU kind, e.g. nvidia-h100-x2) it runs only the sharding overhead: replicated vs sharded
# optimizer at DP=2 on the Qwen3-0.6B shape, step time and memory per rank:
#   run(kind="nvidia-h100-x2", carry=[".whl", ".fi_cache"], timeout_s=400,
#       command="DP=2 bash scripts/trainer_scale_gpu.sh")
set -u
OUT=${OUT:-/tmp/kiln_trainer_scale}
mkdir -p "$OUT"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
free -g | tee -a "$OUT/device.txt"
if [ "${DP:-1}" -gt 1 ]; then
  timeout 360 python3 -m benchmarks.trainer_memory --shape qwen3-0.6b --optimizers replicated,sharded \
    --dp "$DP" --recompute none --steps 4 --out "$OUT/memory_dp$DP.json" 2>&1 | grep -v -i warn \
    | tee "$OUT/memory_dp$DP.log"
  exit 0
fi
timeout -s INT -k 15 120 python3 -m pytest -m gpu tests/test_trainer_scale.py -q -p no:cacheprovider 2>&1 | tail -5 \
  | tee "$OUT/pytest.log"
timeout 150 python3 -m benchmarks.trainer_memory --shape qwen3-0.6b --optimizers replicated,sharded,offload \
  --recompute none --steps 3 --out "$OUT/memory_0.6b.json" 2>&1 | grep -v -i warn | tee "$OUT/memory_0.6b.log"
timeout $(( 590 - SECONDS )) python3 -m benchmarks.trainer_memory --shape qwen3-8b --optimizers offload \
  --recompute full --tokens 16384 --micro-batches 2 --steps 2 --out "$OUT/memory_8b.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/memory_8b.log"
echo "== summary ($SECONDS s) =="
grep -h '^{' "$OUT"/memory_0.6b.log "$OUT"/memory_8b.log 2>/dev/null
grep -E '[0-9]+ (passed|failed|skipped)' "$OUT/pytest.log" | tail -1
