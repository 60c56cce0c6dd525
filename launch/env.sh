# Environment for every rank of a run, sourced by the launch scripts (which pass it on to all ranks).
# Any value can be overridden by exporting it before calling a launch script.
#   MBDS_MODULE      module the ranks run (default mosaicbert_ds.cli; mosaicbert_ds.train.distributed
#                    runs the launch check instead of training)
#   MBDS_EXTRA_ENV   names of further variables to hand to every rank, space separated

# NCCL: which interfaces carry bootstrap and socket traffic. "^lo,docker0" means any but loopback
# and docker's bridge; set the real one (e.g. eth0, ens5, bond0) on clusters with several.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker0}"
# NCCL_IB_HCA (optional): the InfiniBand/RoCE adapters to use, e.g. mlx5_0,mlx5_1; unset = all.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"  # INFO prints the rings/trees and transports chosen
# The lent H200 machines: no NVLink SHARP / multicast, in NCCL, torch symmetric memory and NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# Timeouts. DEEPSPEED_TIMEOUT (minutes) is the process-group timeout deepspeed.init_distributed
# uses (default 10: too short for a first checkpoint write or a slow MDS download on 200 GPUs).
# With async error handling a rank whose collective times out aborts the communicator and exits
# instead of hanging the job forever.
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
# HOSTFILE_FIRST_HOST.
mbds_check_hostfile() {
  local vars
  vars="$("${PYTHON:-python}" -m mosaicbert_ds.train.hostfile --check "$1" --print vars)" || exit 2
  eval "$vars"
}

mbds_usage() {
  [ $# -ge 1 ] && [ "$1" != "-h" ] && [ "$1" != "--help" ] && return 0
  sed -n '2,/^set /p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}
