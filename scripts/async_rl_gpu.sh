#!/usr/bin/env bash
# One device call for issue #19 (async share): fully asynchronous vs synchronous RL on two GPUs (trainer on one, engine
# on the other; benchmarks/async_rl.py: the real driver, disaggregated, GRPO + TIS, random-weight Qwen3-0.6B shape,
# long-tailed response lengths: LONG tokens with probability P_LONG, else <= SHORT), samples/s and reward side by side.
#   bash scripts/device_wheels.sh http   # (here, once) its engines are served over HTTP: the image has no web server
#   run(kind="nvidia-h100-x2", carry=[".whl", ".whl_http"], timeout_s=600, command="bash scripts/async_rl_gpu.sh")
# Knobs: STEPS (6, the first a warm-up), PROMPTS (16), SAMPLES (8), SHORT (256), LONG (2048), P_LONG (0.1),
# K (2, --max-staleness).
# Check: both runs finish; the fully run's max lag <= K and no stale drops; speed-up = fully / sync samples/s;
# per-step rewards of both runs in the JSON.
set -u
OUT=${OUT:-/tmp/kiln_async_rl_gpu}
mkdir -p "$OUT"
source scripts/device_env.sh
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
timeout 580 python3 -m benchmarks.async_rl --gpu --shape qwen3-0.6b --steps "${STEPS:-6}" --warmup 1 \
  --prompts "${PROMPTS:-16}" --samples "${SAMPLES:-8}" --short-len "${SHORT:-256}" --long-len "${LONG:-2048}" \
  --p-long "${P_LONG:-0.1}" --max-staleness "${K:-2}" --lr 1e-5 --prompt-len 64 --concurrency 512 \
  --out "$OUT/async_rl_gpu.json" 2>&1 | tee "$OUT/async_rl_gpu.log"
ray stop --force >/dev/null 2>&1
