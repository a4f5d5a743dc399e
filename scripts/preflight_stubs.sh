# BASH_ENV of scripts/preflight.py's dry runs of the device scripts on the CPU (never sourced on the device).
# Each python / python3 / .venv/bin/python invocation is written to $KILN_PREFLIGHT_LOG (the device script's file
# and line, the folder, the interpreter, its arguments, and its stdin for `python3 -`) instead of running; commands
# that need the device, install, wait, or write outside $OUT (nvidia-smi, ray, tar, git, cp, rm, mkdir, mktemp,
# tee, pip, apt-get, sleep) are stand-ins, `timeout` checks its duration and runs its command through the stubs,
# and `source .whl/install.sh` exports what it would without installing.
# The script's own logic (defaults, loops, branches, arrays, `set -u`) runs for real.

_pf_stubs_file=${BASH_SOURCE[0]}

_pf_where() {  # "FILE<TAB>LINE": the device script's command that reached the stub (first frame outside this file)
  local i
  for ((i = 1; i + 1 < ${#BASH_SOURCE[@]}; i++)); do
    if [ "${BASH_SOURCE[i + 1]}" != "$_pf_stubs_file" ]; then
      printf '%s\t%s' "${BASH_SOURCE[i + 1]}" "${BASH_LINENO[i]}"
      return
    fi
  done
  printf '?\t0'
}

_pf_record() {  # _pf_record KIND FIELD...: one NUL-separated record, whole: calls run in the background (`&`)
  local where  # write their records at once, and two printfs of one record must not interleave with another's
  where=$(_pf_where)
  {
    if command -v flock > /dev/null; then flock 9; fi
    { printf '\001%s\0%s\0%s\0%s\0' "$1" "${where%%$'\t'*}" "${where#*$'\t'}" "$PWD"; shift; printf '%s\0' "$#" "$@"; } \
      >> "$KILN_PREFLIGHT_LOG"
  } 9>> "$KILN_PREFLIGHT_LOG.lock"
}

_pf_python() {  # _pf_python INTERPRETER ARG...: record the call; stdin kept for `python3 - ...` (a heredoc)
  local code="" a
  if [ "${2:-}" = -m ] && [ "${3:-}" = pip ]; then return 0; fi   # `python3 -m pip ...` installs: a stand-in as pip
  for a in "${@:2}"; do
    if [ "$a" = - ]; then code=$(cat); break; fi
  done
  _pf_record python "$code" "$@"
  return 0
}
python() { _pf_python python "$@"; }
python3() { _pf_python python3 "$@"; }
.venv/bin/python() { _pf_python .venv/bin/python "$@"; }
./.venv/bin/python() { _pf_python ./.venv/bin/python "$@"; }

timeout() {  # coreutils' options, then a duration (checked), then the command, run (through the stubs)
  while [ $# -gt 0 ]; do
    case $1 in
      -k | -s | --kill-after | --signal) shift 2 ;;
      -k* | -s* | --*=* | --foreground | --preserve-status | -v | --verbose) shift ;;
      *) break ;;
    esac
  done
  if ! [[ ${1:-} =~ ^[0-9]+(\.[0-9]+)?[smhd]?$ ]]; then
    _pf_record note "timeout: invalid time interval '${1:-}'"
    return 125
  fi
  shift
  "$@"
}

nvidia-smi() {  # a plausible H100 answer to the queries the scripts make
  case " $* " in
    *" topo "*) printf '\tGPU0\tGPU1\nGPU0\t X \tNV18\nGPU1\tNV18\t X \n' ;;
    *--query-gpu=memory.total\ *) echo 81559 ;;
    *) echo "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04" ;;
  esac
}

_pf_source() {  # .whl/install.sh (the carried wheels): its exports, nothing installed; any other file is sourced
  if [ "${1:-}" = .whl/install.sh ] || [ "${1:-}" = ./.whl/install.sh ]; then
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH NCCL_NVLS_ENABLE=0 \
      TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    return 0
  fi
  builtin source "$@"
}
source() { _pf_source "$@"; }
.() { _pf_source "$@"; }

cd() { builtin cd "$@" 2>/dev/null || true; }   # a folder made on the device: stay in the tree
tee() { cat; }
mktemp() { echo "${KILN_PREFLIGHT_TMP:-/tmp}/mktemp"; }
ray() { :; }
tar() { :; }
git() { :; }
cp() { :; }
rm() { :; }
mkdir() { :; }
free() { echo "Mem: 2015 20 1990 0 5 1990"; }
pip() { :; }
pip3() { :; }
apt-get() { :; }
sleep() { :; }
