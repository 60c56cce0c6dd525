# Environment for every rank of a run, sourced by the launch scripts (which pass it on to all ranks).
# Any value can be overridden by exporting it before calling a launch script.
#   MBDS_MODULE      module the ranks run (default mosaicbert_ds.cli; mosaicbert_ds.train.distributed
#                    runs the launch check instead of training)
#   MBDS_EXTRA_ENV   names of further variables to hand to every rank, space separated
#   MBDS_DISABLE_NVLS  1 switches NVLink SHARP / multicast off (NCCL, torch symmetric memory, NVSHMEM)
#   MBDS_RESOLVE_WAIT  seconds a node other than node 0 retries resolving MASTER_ADDR (deepspeed_no_ssh.sh;
#                    default 120)

# NCCL: which interfaces carry bootstrap and socket traffic. "^lo,docker0" means any but loopback
# and docker's bridge; set the real one (e.g. eth0, ens5, bond0) on clusters with several.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker0}"
# NCCL_IB_HCA (optional): the InfiniBand/RoCE adapters to use, e.g. mlx5_0,mlx5_1; unset = all.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"  # INFO prints the rings/trees and transports chosen

# One line and exit code 2 for a bad launch variable, before any launcher starts.
mbds_fail() {
  printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
  exit 2
}

# mbds_check_int NAME MIN [MAX [WHY]]: NAME, when set and not empty, must be an integer in MIN..MAX.
mbds_check_int() {
  local name="$1" min="$2" max="${3:-}" why="${4:-}" value="${!1:-}"
  [ -n "$value" ] || return 0
  [[ "$value" =~ ^[0-9]+$ ]] || mbds_fail "$name='$value' is not a non-negative integer"
  value=$((10#$value))
  if [ "$value" -lt "$min" ] || { [ -n "$max" ] && [ "$value" -gt "$max" ]; }; then
    local range="$min or more"
    [ -z "$max" ] || range="between $min and $max"
    mbds_fail "$name=$value is out of range: it must be $range${why:+ ($why)}"
  fi
}

# mbds_require NAME WHAT: NAME must be set and not empty.
mbds_require() {
  [ -n "${!1:-}" ] || mbds_fail "set $1 ($2)"
}

# NVLink SHARP / multicast stay as NCCL, torch and NVSHMEM choose (on where the fabric has them).
# MBDS_DISABLE_NVLS=1 switches them off, for machines whose NVSwitch fabric or driver cannot serve
# multicast (NCCL then fails at its first collective, e.g. "transport/nvls.cc ... invalid argument").
case "${MBDS_DISABLE_NVLS:-0}" in
  0) ;;
  1) export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 ;;
  *) mbds_fail "MBDS_DISABLE_NVLS='${MBDS_DISABLE_NVLS}' must be 0 (default: NVLink SHARP as NCCL chooses) or 1 (off)" ;;
esac

# Timeouts. DEEPSPEED_TIMEOUT (minutes) is the process-group timeout deepspeed.init_distributed
# uses (default 10: too short for a first checkpoint write or a slow MDS download on 200 GPUs).
# With async error handling a rank whose collective times out aborts the communicator and exits
# instead of hanging the job forever.
mbds_check_int DEEPSPEED_TIMEOUT 1 "" "minutes"
export DEEPSPEED_TIMEOUT="${DEEPSPEED_TIMEOUT:-30}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

export PYTHONUNBUFFERED=1
export MBDS_MODULE="${MBDS_MODULE:-mosaicbert_ds.cli}"

# Names of the variables every rank must see: the fixed ones above, any other NCCL_*/TORCH_NCCL_*
# set in the caller's environment, and MBDS_EXTRA_ENV.
mbds_env_names() {
  local name
  for name in NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS DEEPSPEED_TIMEOUT \
              PYTHONUNBUFFERED MBDS_MODULE $(compgen -e | grep -E '^(NCCL_|TORCH_NCCL_)') ${MBDS_EXTRA_ENV:-}; do
    printf '%s\n' "$name"
  done | sort -u
}

# KEY=VALUE lines, the format of DeepSpeed's .deepspeed_env (no comments or blank lines: its
# reader splits every line on "=").
mbds_env_lines() {
  local name
  for name in $(mbds_env_names); do
    if [ -n "${!name+x}" ]; then printf '%s=%s\n' "$name" "${!name}"; fi
  done
}

# Check a hostfile before any GPU time is spent; sets HOSTFILE_NODES, HOSTFILE_SLOTS and
# HOSTFILE_FIRST_HOST. mbds_check_hostfile FILE [MASTER [WAIT]]: with MASTER (empty: the first
# host) also check that the master address resolves, retrying for WAIT seconds (default 0).
mbds_check_hostfile() {
  local vars extra=()
  if [ $# -ge 2 ]; then extra=(--master-addr "$2" --resolve-wait "${3:-0}"); fi
  vars="$("${PYTHON:-python}" -m mosaicbert_ds.train.hostfile --check "$1" --print vars ${extra[@]+"${extra[@]}"})" || exit 2
  eval "$vars"
}

mbds_usage() {
  [ $# -ge 1 ] && [ "$1" != "-h" ] && [ "$1" != "--help" ] && return 0
  sed -n '2,/^set /p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

# The variables every script reads, checked before any launcher starts.
mbds_check_int MASTER_PORT 1 65535
mbds_check_int NUM_NODES 1
mbds_check_int GPUS_PER_NODE 1
mbds_check_int NODE_RANK 0
mbds_check_int NP 1
mbds_check_int MBDS_RESOLVE_WAIT 0
