# Sourced at the start of every device call: carried wheels, flashinfer's JIT cache, unbuffered Python.
#   run(command="bash scripts/<check>.sh", carry=[".whl", ".fi_cache"])
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
source .whl/install.sh     # also keeps NVLink multicast off (NCCL_NVLS_ENABLE=0, ...)
if [ -f .fi_cache/flashinfer_cache.tar.gz ]; then
  mkdir -p ~/.cache && tar xzf .fi_cache/flashinfer_cache.tar.gz -C ~/.cache
fi
