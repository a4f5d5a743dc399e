#!/usr/bin/env bash
# One device call for the RL rollout's speed (issue #17's 25,000 tokens/s/GPU at W1; #22's FP8 KV): what bounds W1's
# decode, in the engine alone, on the Qwen3-0.6B shape (one model folder for every part). Engine-only: carry the
# smaller wheel set,
#   bash scripts/device_wheels.sh engine
#   run(carry=[".whl_engine", ".fi_cache_all"], timeout_s=600,
#       command="mv .whl_engine .whl; bash scripts/rollout_speed_gpu.sh")
# 1. shared-prefix decode, one layer of a W1-shaped step (benchmarks/shared_prefix_attention.py): off, on, and the
#    pieces of "on" against the KV bytes each reads, at suffixes of 1, 256, 512 and 1,024 tokens;
# 2. the KV cache, W1's GRPO batch and decode batches 64 / 256 (benchmarks/engine_throughput.py): bf16, e4m3 with
#    flashinfer's CUDA-core decode, e4m3 with its tensor-core decode (the default for e4m3 since 2026-12-06);
# 3. a profile of a W1-shaped decode step (32 prompts x 8, 256-token prompts, after 512 output tokens), shared-prefix
#    decode off and on (kernel tables in $OUT/grpo_sp_{off,on}_bs256.txt).
# SKIP_ATTN=1 / SKIP_KV=1 / SKIP_PROFILE=1 skip a part; LIMIT_S (585) bounds the whole call, each part gets what is
# left. Logs to $OUT.
set -u
OUT=${OUT:-/tmp/kiln_rollout_speed}
mkdir -p "$OUT"
source scripts/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
MODEL=/tmp/kiln_models/qwen3-0.6b
LIMIT=${LIMIT_S:-585}

if [ "${SKIP_ATTN:-0}" != 1 ]; then
  rem=$(( LIMIT - SECONDS - 5 ))
  timeout "$(( rem < 90 ? rem : 90 ))" python3 -m benchmarks.shared_prefix_attention --suffix 1 --suffix 256 \
    --suffix 512 --suffix 1024 2>&1 | tee "$OUT/shared_prefix_attention.log"
fi

if [ "${SKIP_KV:-0}" != 1 ]; then
  for kv in "auto --decode-tensor-cores off" "fp8_e4m3 --decode-tensor-cores off" "fp8_e4m3 --decode-tensor-cores on"; do
    rem=$(( LIMIT - SECONDS - 5 ))
    if [ "$rem" -lt 60 ]; then echo "kv cache $kv: not run ($rem s left)"; continue; fi
    echo "== KV cache: $kv =="
    # shellcheck disable=SC2086
    # 200 s: a kernel the carried cache lacks (e4m3 CUDA-core decode) is compiled first
    timeout "$(( rem < 200 ? rem : 200 ))" python3 -m benchmarks.engine_throughput --model-dir "$MODEL" \
      --decode-batches 64,256 --offline "" --grpo 64x8x256x1024 --grpo-logprobs --hf-batches "" --overlap on \
      --kv-cache-dtype $kv 2>&1 | grep -v -E "Writing model" | tail -14 | tee -a "$OUT/kv_cache.log"
  done
fi

if [ "${SKIP_PROFILE:-0}" != 1 ]; then
  for sp in off on; do
    rem=$(( LIMIT - SECONDS - 5 ))
    if [ "$rem" -lt 60 ]; then echo "profile, shared-prefix decode $sp: not run ($rem s left)"; continue; fi
    echo "== profile, shared-prefix decode $sp =="
    timeout "$(( rem < 120 ? rem : 120 ))" python3 -m benchmarks.engine_throughput --model-dir "$MODEL" \
      --decode-batches "" --offline "" --grpo "" --hf-batches "" --profile 256 --profile-n 8 \
      --profile-prompt-len 256 --profile-after 512 --shared-prefix-decode "$sp" --profile-name "grpo_sp_$sp" 2>&1 \
      | grep -v -E "Writing model" | tail -40 | tee -a "$OUT/profile.log"
  done
fi

tar czf "$OUT/flashinfer_cache.tar.gz" -C ~/.cache flashinfer 2>/dev/null   # if it comes back: .fi_cache_all/
echo "rollout_speed_gpu: ${SECONDS}s in all"
