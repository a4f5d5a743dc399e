#!/usr/bin/env bash
# One device call: Kiln's RL step (benchmarks/rl_step.py, workload W1, colocated, one GPU) twice in the same call,
# A and B differing only in the train.py flags A_SET / B_SET (space-separated FLAG=VALUE), so their figures compare.
# Default: the old log-probs from a separate pass (A) against from the update's own forward (B, the default since
# 2026-12-06).
#   run(kind="nvidia-h100-x1", carry=[".whl", ".fi_cache"], timeout_s=600, command="bash scripts/rl_step_ab.sh")
# Then, with the time left (LIMIT_S, default 590), the engine alone on the rollout's batch (issue #17's "rollout phase
# vs the engine alone" row): benchmarks/engine_throughput.py's GRPO row, 64 prompts x n=8, 256 in, 1024 out, T=1,
# each token's log-prob returned as the rollout asks (`--grpo-logprobs`, since 2026-12-06, third session), on
# the same model folder, the engine sized from an empty GPU (the RL step's engine from what the trainer leaves).
# SHAPE (qwen3-0.6b), STEPS (2 measured after one warm-up), T_RUN (timeout of each run, s; 300: the first run of a
# fresh machine took 280 s to its last step on 2026-12-06, flashinfer JIT included), SKIP_ALONE=1.
set -u
OUT=${OUT:-/tmp/kiln_rl_step_ab}
mkdir -p "$OUT"
source scripts/device_env.sh
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
SHAPE=${SHAPE:-qwen3-0.6b}
A_SET=${A_SET-old-logprobs-from-update=false}
B_SET=${B_SET-old-logprobs-from-update=true}
for side in A B; do
  sets=$([ $side = A ] && echo "$A_SET" || echo "$B_SET")
  args=()
  for s in $sets; do args+=(--set "$s"); done
  echo "== $side: $sets =="
  timeout "${T_RUN:-300}" python3 -m benchmarks.rl_step --shape "$SHAPE" --steps "${STEPS:-2}" \
    --model-dir "/tmp/kiln_models/$SHAPE" --out "$OUT/rl_step_$side.json" "${args[@]}" 2>&1 \
    | grep -v -E "Writing model|socket.cpp" | tail -22 | tee "$OUT/rl_step_$side.log"
  ray stop --force >/dev/null 2>&1
done
python3 - "$OUT" "$A_SET" "$B_SET" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| run | flags | step s | rollout (engines idle) | train | push | onload+offload | tokens/s/GPU |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for side, sets in (("A", sys.argv[2]), ("B", sys.argv[3])):
    f = out / f"rl_step_{side}.json"
    if not f.exists():
        print(f"| {side} | {sets} | no result |")
        continue
    m = json.loads(f.read_text())["mean"]
    p = m["phases_s"]
    idle = m.get("rollout_engine_idle_s")
    idle = "-" if idle is None else f"{idle:.2f}"
    print(f"| {side} | {sets} | {m['step_s']:.2f} | {p['rollout']:.2f} ({idle}) | {p['train']:.2f} | {p['push']:.2f} | "
          f"{p['onload'] + p['offload']:.2f} | {m['tokens_per_s_per_gpu']:.0f} |")
PY
left=$(( ${LIMIT_S:-590} - SECONDS - 10 ))
if [ "${SKIP_ALONE:-0}" != 1 ] && [ "$left" -gt 90 ]; then
  echo "== engine alone, same batch =="
  timeout "$left" python3 -m benchmarks.engine_throughput --shape "$SHAPE" --model-dir "/tmp/kiln_models/$SHAPE" \
    --decode-batches "" --hf-batches "" --offline "" --grpo 64x8x256x1024 --grpo-logprobs --overlap on --offline-overlap on 2>&1 \
    | grep -v -E "Writing model" | tail -8 | tee "$OUT/engine_alone.log"
else
  echo "engine alone: not run ($left s left)"
fi
echo "rl_step_ab: $SECONDS s"
