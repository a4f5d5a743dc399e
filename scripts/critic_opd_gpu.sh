#!/usr/bin/env bash
# One device call for issue #19's PPO-with-critic and on-policy distillation on one GPU: the quickstart task
# (tiny Qwen3, bf16 trainer, colocated) through train.py with --advantage-estimator gae (the critic in the policy's
# ranks: bf16 trunk, fp32 value head, offloaded with the policy), then with --use-opd --opd-type megatron (the
# teacher, a longer-SFT copy, inside the trainer; --opd-type engine wants a device of its own for the teacher, so it
# needs a second GPU or --opd-teacher-url). Checks: both runs finish, value_loss / critic_grad_norm finite and > 0,
# opd_reverse_kl finite; the metrics lines and logs land in $OUT.
#   run(command="bash scripts/critic_opd_gpu.sh", carry=[".whl", ".fi_cache"], timeout_s=600)
# STEPS (40) per run; SKIP_GAE=1 / SKIP_OPD=1 run one part.
set -u
OUT=${OUT:-/tmp/kiln_critic_opd_gpu}
mkdir -p "$OUT"
source scripts/device_env.sh
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
WORK=/tmp/kiln_critic_opd_work
mkdir -p "$WORK"
python3 -m examples.quickstart.make_data "$WORK/data" --max-operand 19 >/dev/null
python3 -m examples.quickstart.sft --data "$WORK/data/sft.jsonl" --out "$WORK/student" --steps 260 | tail -1
COMMON=(--config examples/quickstart/config.yaml --rollout-client ray --prompt-data "$WORK/data/train.jsonl"
        --eval-prompt-data "$WORK/data/test.jsonl" --num-rollout "${STEPS:-40}" --lr-decay-steps "${STEPS:-40}")
if [ "${SKIP_GAE:-0}" != 1 ]; then
  timeout 250 python3 train.py "${COMMON[@]}" --hf-checkpoint "$WORK/student" --advantage-estimator gae --lambd 0.95 \
    --metrics-file "$OUT/gae_metrics.jsonl" 2>&1 | tail -25 | tee "$OUT/gae.log"
  ray stop --force >/dev/null 2>&1
fi
if [ "${SKIP_OPD:-0}" != 1 ]; then
  python3 -m examples.quickstart.sft --data "$WORK/data/sft.jsonl" --out "$WORK/teacher" --steps 2500 | tail -1
  timeout 250 python3 train.py "${COMMON[@]}" --hf-checkpoint "$WORK/student" --use-opd --opd-type megatron \
    --opd-teacher-load "$WORK/teacher" --metrics-file "$OUT/opd_metrics.jsonl" 2>&1 | tail -25 | tee "$OUT/opd.log"
  ray stop --force >/dev/null 2>&1
fi
python3 - "$OUT" <<'EOF'
import json, math, sys
from pathlib import Path
out = Path(sys.argv[1])
for name, keys in (("gae", ("train/value_loss", "train/critic_grad_norm")), ("opd", ("train/opd_reverse_kl",))):
    f = out / f"{name}_metrics.jsonl"
    if not f.exists():
        print(f"{name}: no metrics"); continue
    rows = [json.loads(line) for line in f.read_text().splitlines() if '"train/' in line]
    ok = rows and all(math.isfinite(r[k]) for r in rows for k in keys)
    ok = ok and (name != "gae" or all(r["train/value_loss"] > 0 and r["train/critic_grad_norm"] > 0 for r in rows))
    rew = [r.get("rollout/reward_mean", float("nan")) for r in rows]
    print(f"{name}: {len(rows)} steps, {'OK' if ok else 'FAILED'}, reward first 5 {sum(rew[:5]) / 5:.3f} "
          f"last 5 {sum(rew[-5:]) / 5:.3f}")
EOF
