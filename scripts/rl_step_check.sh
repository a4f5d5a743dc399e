#!/usr/bin/env bash
# One device call for issue #17 step 1: Kiln's RL step (benchmarks/rl_step.py: the real driver, colocated on one GPU,
# GRPO, workload W1 = 64 prompts x 8 samples, 256-token prompts, 1024-token responses) on the Qwen3-0.6B and 1.7B
# shapes, then TRL's GRPOTrainer on the 0.6B shape and the same workload (benchmarks/trl_grpo.py) with the time left.
# Logs and JSON under $OUT, a short table last. TRL travels as a wheel: run `PEERS=1 ../shared/device/prepare-wheels.sh`
# here first (without it the TRL row says "skipped").
#   run(kind="nvidia-h100-x1", carry=[".whl", ".fi_cache"], timeout_s=600,
#       command="source scripts/device_env.sh; LIMIT_S=590 bash scripts/rl_step_check.sh")
# LIMIT_S: the call's limit (TRL gets what is left of it, one step by default: TRL_WARMUP=0 TRL_STEPS=1; HF generate
# of 512 x 1024 tokens takes minutes, so it may well be cut: its per-step lines are printed as each step ends);
# STEPS_06 / STEPS_17: Kiln's measured steps after one warm-up; T06 / T17: timeouts of the two Kiln runs (the first
# includes flashinfer's JIT build, ~110 s, unless .fi_cache/ is carried); SKIP_17=1 leaves out the 1.7B shape (so that
# the 0.6B shape and TRL's step fit one call), SKIP_06=1 the 0.6B shape; SKIP_KILN=1 or SKIP_TRL=1 runs one side
# only (SKIP_KILN=1 LIMIT_S=590 gives TRL a call of its own).
set -u
OUT=${OUT:-/tmp/kiln_rl_step_check}
mkdir -p "$OUT"
source scripts/device_env.sh
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
MODELS=/tmp/kiln_models   # random-weight folders, kept while the machine is warm (not under $OUT: GBs)
mkdir -p "$MODELS"
if [ "${SKIP_KILN:-0}" != 1 ]; then
  if [ "${SKIP_06:-0}" != 1 ]; then
    timeout "${T06:-260}" python3 -m benchmarks.rl_step --shape qwen3-0.6b --steps "${STEPS_06:-3}" \
      --model-dir "$MODELS/qwen3-0.6b" --out "$OUT/rl_step_qwen3-0.6b.json" 2>&1 | tee "$OUT/rl_step_qwen3-0.6b.log"
    ray stop --force >/dev/null 2>&1   # a run cut by its timeout leaves no Ray worker holding the GPU
  fi
  if [ "${SKIP_17:-0}" != 1 ]; then
    timeout "${T17:-230}" python3 -m benchmarks.rl_step --shape qwen3-1.7b --steps "${STEPS_17:-2}" \
      --model-dir "$MODELS/qwen3-1.7b" --out "$OUT/rl_step_qwen3-1.7b.json" 2>&1 | tee "$OUT/rl_step_qwen3-1.7b.log"
    ray stop --force >/dev/null 2>&1
  fi
  tar czf "$OUT/flashinfer_cache.tar.gz" -C ~/.cache flashinfer 2>/dev/null   # keep as .fi_cache/ for next time
fi
if [ "${SKIP_TRL:-0}" != 1 ]; then
  left=$(( ${LIMIT_S:-590} - SECONDS - 15 ))
  if [ "$left" -gt 60 ]; then
    timeout "$left" python3 -m benchmarks.trl_grpo --shape qwen3-0.6b --warmup "${TRL_WARMUP:-0}" \
      --steps "${TRL_STEPS:-1}" --model-dir "$MODELS/qwen3-0.6b" --out "$OUT/trl_grpo_qwen3-0.6b.json" 2>&1 \
      | tee "$OUT/trl_grpo_qwen3-0.6b.log"
  else
    echo "TRL: not run, ${left} s left" | tee "$OUT/trl_grpo_qwen3-0.6b.log"
  fi
fi
echo "== summary ($SECONDS s) =="
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| run | step s | rollout | train | push | onload+offload | other | tokens/s/GPU | peak GiB (eng/trn/dev) "
      "| KV pool |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for shape in ("qwen3-0.6b", "qwen3-1.7b"):
    f = out / f"rl_step_{shape}.json"
    if not f.exists():
        print(f"| kiln {shape} | no result (see rl_step_{shape}.log) |")
        continue
    r = json.loads(f.read_text())
    m, p = r["mean"], r["mean"]["phases_s"]
    peak = [max((v[k] for v in m["peak_memory"].values() if v[k] is not None), default=None)
            for k in ("engine_gb", "trainer_gb", "device_used_gb")]
    kv = r["steps"][-1]["kv_pool_tokens"]
    print(f"| kiln {shape} | {m['step_s']:.1f} | {p['rollout']:.1f} | {p['train']:.1f} | {p['push']:.2f} | "
          f"{p['onload'] + p['offload']:.2f} | {p['other'] + p['engine_check']:.2f} | "
          f"{m['tokens_per_s_per_gpu']:.0f} | "
          + "/".join("-" if v is None else f"{v:.1f}" for v in peak) + f" | {kv} |")
f = out / "trl_grpo_qwen3-0.6b.json"
if f.exists():
    r = json.loads(f.read_text())
    if "skipped" in r:
        print(f"| trl qwen3-0.6b | skipped: {r['skipped'][:80]} |")
    else:
        print(f"| trl {r['trl']} qwen3-0.6b | {r['step_s']:.1f} | (in step) | (in step) | - | - | - | "
              f"{r['tokens_per_s_per_gpu']:.0f} | {r['peak_gib'] or 0:.1f} (one process) | - |")
else:
    print("| trl qwen3-0.6b | no result (timeout? see trl_grpo_qwen3-0.6b.log: per-step lines) |")
EOF
