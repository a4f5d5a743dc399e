#!/usr/bin/env bash
# A smaller set of the carried wheels, for device calls whose carry would pass the device tool's 64 MiB with all of
# .whl/ (56 MiB: ray alone is 31) and the flashinfer JIT cache (.fi_cache/, 5-15 MiB as kernels are added):
#   bash scripts/device_wheels.sh engine   # .whl_engine/: flashinfer and its two dependencies (engine-only calls)
#   bash scripts/device_wheels.sh rl       # .whl_rl/: all but TRL and accelerate (train.py, benchmarks.rl_step)
# then run(carry=[".whl_engine", ".fi_cache"], command="mv .whl_engine .whl; source scripts/device_env.sh; ...").
# And one set carried beside .whl/, not instead of it: the device image has no web server, so engines served over
# HTTP (--rollout-client http, benchmarks/async_rl.py, the HTTP server tests) need
#   bash scripts/device_wheels.sh http     # .whl_http/ (3 MiB): fastapi, starlette, uvicorn, pydantic (the .venv's
#                                          # versions, downloaded from the package index); scripts/device_env.sh
# installs it when it is carried: run(carry=[".whl", ".whl_http"], ...).
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: device_wheels.sh engine|rl|http}
dest=.whl_$kind
rm -rf "$dest" && mkdir -p "$dest"
case $kind in
  engine) cp .whl/install.sh .whl/flashinfer_python.tar.xz .whl/apache_tvm_ffi-*.whl .whl/nvidia_ml_py-*.whl "$dest/" ;;
  rl) find .whl -maxdepth 1 -type f ! -name 'trl-*' ! -name 'accelerate-*' -exec cp {} "$dest/" \; ;;
  http)  # the versions this project's .venv runs; what the image lacks of fastapi's and uvicorn's dependencies
    pins=$(.venv/bin/python -c "from importlib.metadata import version as v; print(' '.join(f'{n}=={v(n)}' for n in
      ('fastapi', 'starlette', 'uvicorn', 'pydantic', 'pydantic_core', 'annotated_types', 'typing_inspection')))")
    # shellcheck disable=SC2086
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dest" $pins ;;
  *) echo "device_wheels.sh: unknown set '$kind' (engine, rl or http)" >&2; exit 2 ;;
esac
du -sh "$dest"
