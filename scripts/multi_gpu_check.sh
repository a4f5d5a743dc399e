#!/usr/bin/env bash
# Issue 8 in one device call on 2 GPUs: NCCL weight push (0.6B into a real Engine, 8B into preallocated tensors,
# against NCCL all-reduce bus bandwidth), engine TP=2 vs TP=1, trainer TP=2 vs TP=1, two engines behind the router,
# and a 3-step disaggregated GRPO run of train.py's driver under Ray. Each step is its own process under `timeout`;
# its log is $OUT/<step>.log; the summary table is printed last and kept in $OUT/summary.md.
#   run(kind="nvidia-h100-x2", timeout_s=420, carry=[".whl", ".fi_cache"], command="bash scripts/multi_gpu_check.sh")
#   bash scripts/multi_gpu_check.sh --cpu     # the same steps on CPU: tiny models, gloo, .venv's python
# BUDGET_S (default 400) bounds the whole script: a step's limit is cut to the time left, and a step that would get
# under 20 s is not started. STEPS (default: all, in this order) picks steps by name. Each step prints one line per
# phase as it goes, and 12 s before its limit every process of it prints its threads' Python stacks into its log.
set -u
MODE=""
if [ "${1:-}" = "--cpu" ]; then MODE="--cpu"; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # no NVLink multicast, ever
OUT=${OUT:-/tmp/kiln_multi_gpu}
mkdir -p "$OUT"
BUDGET=${BUDGET_S:-400}
SUMMARY="$OUT/summary.md"
if [ -z "$MODE" ]; then
  source scripts/device_env.sh
  PY=python3
  {
    echo "machine: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sort | uniq -c | xargs)"
    python3 -c "import torch, ray; print('torch', torch.__version__, 'nccl', '.'.join(map(str, torch.cuda.nccl.version())), 'ray', ray.__version__)"
    nvidia-smi topo -m | head -3
  } > "$SUMMARY" 2>&1
else
  PY=${PYTHON:-.venv/bin/python}
  export OMP_NUM_THREADS=1
  echo "machine: CPU ($(nproc) cores), --cpu variant" > "$SUMMARY"
fi
WORK=$(mktemp -d /tmp/kiln_mg.XXXXXX)
declare -A LIMIT=([prepare]=60 [weight-push]=110 [engine-tp]=120 [trainer-tp]=150 [router]=75 [grpo]=150)
STATUS=()

run_step() {  # run_step NAME: one command of benchmarks/multi_gpu.py under its time limit
  local name=$1 left=$(( BUDGET - SECONDS - 5 ))
  local limit=${LIMIT[$name]}
  if [ "$left" -lt 20 ]; then STATUS+=("$name: not run (time budget spent)"); return; fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  local t0=$SECONDS
  # 12 s before the limit every process of the step prints its threads' stacks into the log (KILN_STALL_DUMP_S)
  KILN_STALL_DUMP_S=$(( limit - 12 )) timeout -k 10 "$limit" $PY -m benchmarks.multi_gpu "$name" --work "$WORK" $MODE \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  local verdict="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT after ${limit} s"; elif [ $rc -ne 0 ]; then verdict="FAILED (rc $rc)"; fi
  STATUS+=("$name: $verdict in $(( SECONDS - t0 )) s")
  echo "== $name: $verdict in $(( SECONDS - t0 )) s"
  grep '^| ' "$OUT/$name.log"
  if [ "$verdict" != "ok" ]; then grep -v '^| ' "$OUT/$name.log" | grep -v -i warn | tail -40; fi
  if [ "$name" = prepare ] && [ "$verdict" != "ok" ]; then NO_MODELS=1; fi
}

STEPS=${STEPS:-"prepare weight-push engine-tp trainer-tp router grpo"}
NO_MODELS=0
for name in $STEPS; do
  if [ "$NO_MODELS" = 1 ]; then STATUS+=("$name: not run (prepare failed)"); continue; fi
  run_step "$name"
done
rm -rf "$WORK"

{
  echo
  echo "| item | measure | result |"
  echo "| --- | --- | --- |"
  for name in $STEPS; do grep -h '^| ' "$OUT/$name.log" 2>/dev/null; done
  echo
  printf '%s\n' "${STATUS[@]}"
  echo "total: $SECONDS s"
} >> "$SUMMARY"
echo
echo "== summary =="
cat "$SUMMARY"
