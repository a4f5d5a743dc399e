#!/usr/bin/env bash
# The quickstart on CPU with a local Ray: data -> tiny model + SFT warm-up -> GRPO with train.py -> reward plot.
# Everything goes under ${OUT:-runs/quickstart}; extra arguments are passed on to train.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/quickstart}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline} \
       RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_DEDUP_LOGS=0
rm -rf "$OUT" && mkdir -p "$OUT"
"$PY" -m examples.quickstart.make_data "$OUT/data" --max-operand 19
"$PY" -m examples.quickstart.sft --data "$OUT/data/sft.jsonl" --out "$OUT/sft_model" --steps "${SFT_STEPS:-260}"
"$PY" train.py --config examples/quickstart/config.yaml \
  --hf-checkpoint "$OUT/sft_model" \
  --prompt-data "$OUT/data/train.jsonl" --eval-prompt-data "$OUT/data/test.jsonl" \
  --num-rollout "${STEPS:-240}" \
  --metrics-file "$OUT/metrics.jsonl" --save "$OUT/checkpoints" "$@"
"$PY" -m examples.quickstart.plot "$OUT/metrics.jsonl" "$OUT/reward_curve.png"
echo "quickstart: ${SECONDS}s in all"
