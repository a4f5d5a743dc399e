#!/usr/bin/env bash
# A smaller set of the carried wheels, for device calls whose carry would pass the device tool's 64 MiB with all of
# .whl/ (56 MiB: ray alone is 31) and the flashinfer JIT cache (.fi_cache/, 5-15 MiB as kernels are added):
#   bash scripts/device_wheels.sh engine   # .whl_engine/: flashinfer and its two dependencies (engine-only calls)
#   bash scripts/device_wheels.sh rl       # .whl_rl/: all but TRL and accelerate (train.py, benchmarks.rl_step)
# then run(carry=[".whl_engine", ".fi_cache"], command="mv .whl_engine .whl; source scripts/device_env.sh; ...").
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: device_wheels.sh engine|rl}
dest=.whl_$kind
rm -rf "$dest" && mkdir -p "$dest"
case $kind in
  engine) cp .whl/install.sh .whl/flashinfer_python.tar.xz .whl/apache_tvm_ffi-*.whl .whl/nvidia_ml_py-*.whl "$dest/" ;;
  rl) find .whl -maxdepth 1 -type f ! -name 'trl-*' ! -name 'accelerate-*' -exec cp {} "$dest/" \; ;;
  *) echo "device_wheels.sh: unknown set '$kind' (engine or rl)" >&2; exit 2 ;;
esac
du -sh "$dest"
