# Sourced at the start of every device call: carried wheels, flashinfer's JIT cache, unbuffered Python.
#   run(command="bash scripts/<check>.sh", carry=[".whl", ".fi_cache"])
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
source .whl/install.sh     # also keeps NVLink multicast off (NCCL_NVLS_ENABLE=0, ...)
if [ -d .whl_http ] && [ ! -f /tmp/site/.kiln-http ]; then   # the web server (scripts/device_wheels.sh http)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_http/*.whl \
    && touch /tmp/site/.kiln-http
fi
# .fi_cache_all/ (the whole cache, carried by calls with the smaller wheel sets) or .fi_cache/ (its head-dim-128 bf16
# kernels, small enough to carry beside all of .whl/)
for cache in .fi_cache_all .fi_cache; do
  if [ -f $cache/flashinfer_cache.tar.gz ]; then
    mkdir -p ~/.cache && tar xzf $cache/flashinfer_cache.tar.gz -C ~/.cache
    break
  fi
done
