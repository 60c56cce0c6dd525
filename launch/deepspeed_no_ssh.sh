#!/usr/bin/env bash
# One invocation per node (Kubernetes, or any scheduler that starts one process per node); each
# starts DeepSpeed's per-node launcher for its own GPUs, no ssh:
#   NODE_RANK=0 MASTER_ADDR=node0 NUM_NODES=2 GPUS_PER_NODE=8 launch/deepspeed_no_ssh.sh RUN [key=value ...]
#   NODE_RANK=1 MASTER_ADDR=node0 NUM_NODES=2 GPUS_PER_NODE=8 launch/deepspeed_no_ssh.sh RUN [key=value ...]
# HOSTFILE=FILE may replace NUM_NODES/GPUS_PER_NODE (only the order and slots of its lines matter).
# MASTER_PORT defaults to 29500. Every node must use the same values except NODE_RANK.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mbds_usage "$@"
run_file="$1"; shift
mbds_require NODE_RANK "0 on the master node"
mbds_require MASTER_ADDR "the address of node 0"

hostfile="${HOSTFILE:-}"
if [ -z "$hostfile" ]; then
  mbds_require NUM_NODES "and GPUS_PER_NODE, or HOSTFILE"
  mbds_require GPUS_PER_NODE "GPUs, or CPU ranks, per node"
  hostfile="$(mktemp "${TMPDIR:-/tmp}/mbds-hostfile.XXXXXX")"
  trap 'rm -f "$hostfile"' EXIT
  for ((i = 0; i < 10#$NUM_NODES; i++)); do echo "node$i slots=$GPUS_PER_NODE"; done > "$hostfile"
fi
# MASTER_ADDR must resolve; node 0's DNS name may appear only once it runs (Kubernetes): the other
# nodes retry for MBDS_RESOLVE_WAIT seconds (default 120)
resolve_wait=0
if [ "$((10#$NODE_RANK))" -ne 0 ]; then resolve_wait="${MBDS_RESOLVE_WAIT:-120}"; fi
mbds_check_hostfile "$hostfile" "$MASTER_ADDR" "$resolve_wait"
mbds_check_int NODE_RANK 0 $((HOSTFILE_NODES - 1)) "$HOSTFILE_NODES nodes: 0 is the master"

# Under --no_ssh DeepSpeed neither writes nor reads .deepspeed_env: the ranks inherit this
# shell's environment, so everything env.sh exported reaches them as it is.
args=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}"
      --hostfile "$hostfile")
if [ -n "${HOSTFILE:-}" ] && [ -n "${GPUS_PER_NODE:-}" ]; then args+=(--num_gpus "$GPUS_PER_NODE"); fi
deepspeed "${args[@]}" --no_local_rank --module "$MBDS_MODULE" pretrain "$run_file" "$@"
