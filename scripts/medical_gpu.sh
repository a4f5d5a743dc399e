#!/usr/bin/env bash
# The medical example's three-arm experiment at GPU size, in one device call (issue #18):
#   warm start (all 47 conditions, a wider model, SFT on the GPU) -> per seed: (a) doctor vs the fixed SFT
#   patient, (b) doctor and patient co-trained, (c) doctor vs the rule-based patient -> held-out evaluation
#   -> table.md, results.json, curves.png.
# One GPU: in arms (a) and (b) the two policies share it (config_gpu_rl.yaml: policies_share_devices), so any
# single-GPU device kind runs it. Models and runs go to runs/medical/gpu; the table, results.json, curves.png,
# the logs, metrics and evaluations (runs.tar.gz, without models) go to $OUT (the device call's folder) when set.
#   run(carry=[".whl", ".fi_cache"], timeout_s=600, command="bash scripts/medical_gpu.sh")
# The seeds train side by side on the one GPU (one process and local Ray each; the models are small, so one seed
# alone leaves the GPU mostly idle; every engine's KV pool is sized for its consultations, not from free memory):
# first the warm start and the SFT doctor's evaluations, then one experiment process per seed, then the table of all.
# Everything runs under LIMIT_S (555 s): a call that does not finish is interrupted before the device tool's 600 s,
# so its logs and what it finished still come back; a second call on the warm machine goes on: an arm whose export
# exists and an evaluation already written are not redone, an arm cut off resumes from its newest checkpoint (one
# every SAVE_INTERVAL steps). On 2026-12-06 (H100) the warm start took 186 s, the three seeds of arm (a) side by side
# 335-454 s, of arm (b) 397-427 s: the whole experiment is about three calls on one warm machine.
# The warm start is deterministic on CUDA (warm_start.py --deterministic; its weights' sha256 in warm/warm_start.json and in
# the table's first line), so the arms can be split over sessions: ARMS="fixed rule" in one, ARMS=cotrain in another,
# then both runs.tar.gz unpacked into one folder and `experiment.py DIR --saved-only` (an arm evaluated from another
# warm start is left out). On a fresh machine the script first runs the GPU test that two CUDA warm starts agree.
# Knobs: SEEDS ("0 1 2"), ARMS ("fixed cotrain rule"), STEPS (40), N_EVAL (300), LIMIT_S, SAVE_INTERVAL (5), WARM_ARGS,
# PARALLEL (auto), SKIP_DETERMINISM_TEST, TRAIN_FLAGS (extra train.py flags for every arm); PY (default python3: the device's copy of the
# tree has no .venv; on a machine of your own, PY=.venv/bin/python).
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
SEEDS=${SEEDS:-0 1 2}
# PARALLEL: "seeds" (one process per seed) or "arms" (one per seed and arm: 9 processes, ~15 KV pools of ~4.8 GB,
# which an 80 GB card does not hold); auto: arms on a card of >= 120 GB (H200), else seeds
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
PARALLEL=${PARALLEL:-auto}
if [ "$PARALLEL" = auto ]; then PARALLEL=$([ "${gpu_mib:-0}" -ge 120000 ] && echo arms || echo seeds); fi
echo "medical_gpu: side by side per $PARALLEL (GPU memory ${gpu_mib} MiB)"
# the GPU's memory in use every 5 s (its peak tells whether PARALLEL=arms would fit a smaller card)
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -l 5 2>/dev/null \
  | tee -a "$RUN/gpu_memory_mib.log" > /dev/null &
sampler=$!  # tee's: nvidia-smi ends at its next write once tee is gone
trap 'kill $sampler 2>/dev/null || true' EXIT
deadline=$(( SECONDS + ${LIMIT_S:-555} ))
KEEP=0  # seconds of the deadline kept back (for the table, after the training processes)
left() { echo $(( deadline - KEEP - SECONDS > 1 ? deadline - KEEP - SECONDS : 1 )); }
experiment() {  # experiment.py with this run's settings; extra arguments last
  # shellcheck disable=SC2086
  timeout -s INT -k 20 "${TIMEOUT:-$(left)}" "$PY" -m examples.medical_multiagent.experiment "$RUN" \
    --config examples/medical_multiagent/config_gpu_rl.yaml --steps "${STEPS:-40}" --n-eval "${N_EVAL:-300}" \
    --device cuda --save-interval "${SAVE_INTERVAL:-5}" --warm-args "$WARM_ARGS" --train-flags="$TRAIN_FLAGS" "$@"
}
ARMS=${ARMS:-fixed cotrain rule}  # a subset trains only those (another session can train the rest from the same warm start)
if [ ! -f "$RUN/warm/warm_start.json" ] && [ -z "${SKIP_DETERMINISM_TEST:-}" ]; then  # once per machine, ~30 s
  "$PY" -m pytest -q -m gpu tests/test_medical_learning.py -k cuda_warm_start_is_deterministic -p no:cacheprovider \
    2>&1 | tail -3 | tee "$RUN/determinism_test.log" || true
fi
# the engines' attention (config_gpu_rl.yaml: triton, float32): checked once per machine by its GPU tests (~1 min),
# the torch backend (as runs 1 and 2) if they fail; the choice is kept for the next calls on this machine
if [ ! -f "$RUN/attention_backend.txt" ]; then
  if timeout -s INT -k 15 240 "$PY" -m pytest -q -m gpu tests/test_engine_gpu.py tests/test_triton_kernels.py \
      -k float32 -p no:cacheprovider 2>&1 | tail -3 | tee "$RUN/attention_check.log"; then
    echo triton | tee "$RUN/attention_backend.txt"
  else
    echo "medical_gpu: the float32 triton attention GPU tests failed (above): the torch backend instead"
    echo torch | tee "$RUN/attention_backend.txt"
  fi
fi
TRAIN_FLAGS=${TRAIN_FLAGS:-}
if [ "$(cat "$RUN/attention_backend.txt" 2>/dev/null || echo triton)" = torch ]; then
  TRAIN_FLAGS="$TRAIN_FLAGS --attention-backend torch"
fi
# the warm start and the SFT doctor's two evaluations, once (--eval-only trains nothing)
experiment --seeds $SEEDS --eval-only 2>&1 | tee "$RUN/experiment.log" || status=$?
if [ -z "${status:-}" ]; then
  pids=()
  KEEP=40  # the training stops 40 s before the deadline: the evaluations missing, then the table
  if [ "$PARALLEL" = arms ]; then  # one process (and local Ray) per seed and arm, side by side
    for seed in $SEEDS; do for arm in $ARMS; do
      (OMP_NUM_THREADS=1 experiment --seeds "$seed" --arms "$arm" 2>&1 \
        | tee "$RUN/experiment_s${seed}_$arm.log" > /dev/null) &
      pids+=($!)
    done; done
  else  # one process (and local Ray) per seed, side by side; its three arms in turn
    for seed in $SEEDS; do
      # shellcheck disable=SC2086
      (OMP_NUM_THREADS=2 experiment --seeds "$seed" --arms $ARMS 2>&1 | tee "$RUN/experiment_s$seed.log" > /dev/null) &
      pids+=($!)
    done
  fi
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || status=$?; done
  grep -h -E "^\[" "$RUN"/experiment_s*.log | tee -a "$RUN/experiment.log" || true
  KEEP=0
  if ! experiment --seeds $SEEDS --eval-only 2>&1 | tee -a "$RUN/experiment.log"; then
    status=${status:-1}  # cut off evaluating: the table of what is saved (no model loaded), past the deadline
    TIMEOUT=40 experiment --seeds $SEEDS --saved-only 2>&1 | tee -a "$RUN/experiment.log" || true
  fi
fi
if [ -n "${OUT:-}" ]; then  # a device call brings back 8 files at most: the summaries, and the rest in one archive
  mkdir -p "$OUT/medical_gpu"
  cp "$RUN"/{experiment.log,table.md,results.json,curves.png} "$OUT/medical_gpu/" 2>/dev/null || true
  (cd "$RUN" && tar czf "$OUT/medical_gpu/runs.tar.gz" --exclude='*/hf' --exclude='*/checkpoints' \
    --exclude='warm/sft-*' --exclude='warm/tokenizer' --exclude='warm/data' .) || true  # logs, metrics, evaluations
fi
peak=$(sort -n "$RUN/gpu_memory_mib.log" 2>/dev/null | tail -1)
echo "medical_gpu: ${SECONDS}s in all; GPU memory peak ${peak:-?} MiB of ${gpu_mib} (sampled every 5 s, all calls on this machine); table: $RUN/table.md"
exit "${status:-0}"
