#!/usr/bin/env bash
# The medical example's three-arm experiment at GPU size, in one device call (issue #18):
#   warm start (all 47 conditions, a wider model, SFT on the GPU) -> per seed: (a) doctor vs the fixed SFT
#   patient, (b) doctor and patient co-trained, (c) doctor vs the rule-based patient -> held-out evaluation
#   -> table.md, results.json, curves.png.
# One GPU: in arms (a) and (b) the two policies share it (config_gpu_rl.yaml: policies_share_devices), so any
# single-GPU device kind runs it. Models and runs go to runs/medical/gpu; the table, results.json, curves.png,
# the logs and the GPU names are copied to $OUT (the device call's folder that comes back) when it is set.
#   run(carry=[".whl", ".fi_cache"], timeout_s=600, command="bash scripts/medical_gpu.sh")
# One seed per call by default (a device call is at most 600 s; the time per RL step at this size is not measured
# yet): then SEEDS="0 1" and SEEDS="0 1 2" on the same warm machine; each reuses runs/medical/gpu/warm and the
# arms and evaluations already done, trains the new seed, and writes the table of the seeds it names.
# The experiment runs under LIMIT_S (555 s): a run that does not finish in one call is interrupted before the device
# tool's 600 s, so its logs and what it finished still come back; the next call on the warm machine goes on.
# Knobs: SEEDS ("0"), STEPS (40), N_EVAL (300), LIMIT_S, WARM_ARGS; PY (default python3: the device's copy of the tree
# has no .venv; on a machine of your own, PY=.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .whl/install.sh ]; then source scripts/device_env.sh; fi   # a device call: the carried wheels
RUN=${RUN:-runs/medical/gpu}
PY=${PY:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline} \
       RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_DEDUP_LOGS=0
mkdir -p "$RUN"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$RUN/gpus.csv"
WARM_ARGS=${WARM_ARGS:---conditions all --n-dialogues 8000 --n-train 8000 --n-test 400 --steps 3000 \
--patient-steps 2000 --batch-size 64 --hidden-size 384 --layers 6 --lr 1e-3 --vocab-size 4096 --device cuda}
# shellcheck disable=SC2086
timeout -s INT -k 20 "${LIMIT_S:-555}" "$PY" -m examples.medical_multiagent.experiment "$RUN" --config examples/medical_multiagent/config_gpu_rl.yaml \
  --seeds ${SEEDS:-0} --steps "${STEPS:-40}" --n-eval "${N_EVAL:-300}" --device cuda \
  --warm-args "$WARM_ARGS" 2>&1 | tee "$RUN/experiment.log" || status=$?
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/medical_gpu"
  cp "$RUN"/{gpus.csv,experiment.log,table.md,results.json,curves.png,warm/warm_start.json} "$OUT/medical_gpu/" 2>/dev/null || true
  for log in "$RUN"/*/train.log; do cp "$log" "$OUT/medical_gpu/$(basename "$(dirname "$log")").train.log"; done
fi
echo "medical_gpu: ${SECONDS}s in all; table: $RUN/table.md"
exit "${status:-0}"
