#!/usr/bin/env bash
# Several nodes over ssh: DeepSpeed's launcher starts itself on every host of the hostfile (pdsh).
#   HOSTFILE=launch/hostfile launch/deepspeed_hostfile.sh RUN [key=value ...]
# Needs pdsh, passwordless ssh from this node to every host, and the repository and virtualenv at
# the same path on every node. Optional: MASTER_ADDR (default: the first host), MASTER_PORT
# (29500), NUM_NODES (use the first N hosts), GPUS_PER_NODE (use GPUs 0..N-1 of each).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mbds_usage "$@"
run_file="$1"; shift
mbds_require HOSTFILE "a DeepSpeed hostfile, see launch/hostfile.example"
mbds_check_hostfile "$HOSTFILE" "${MASTER_ADDR:-}"  # the master address (default: the first host) must resolve
mbds_check_int NUM_NODES 1 "$HOSTFILE_NODES" "the hostfile lists $HOSTFILE_NODES hosts"

# pdsh starts a fresh shell on each node: DeepSpeed exports what its env file lists there (it
# forwards only NCCL_*, PYTHON*, UCX*, ... on its own). DS_ENV_FILE is read by the deepspeed runner.
env_file="$(mktemp "${TMPDIR:-/tmp}/mbds-deepspeed-env.XXXXXX")"
trap 'rm -f "$env_file"' EXIT
mbds_env_lines > "$env_file"
export DS_ENV_FILE="$env_file"

args=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$HOSTFILE_FIRST_HOST}" --master_port "${MASTER_PORT:-29500}")
if [ -n "${NUM_NODES:-}" ]; then args+=(--num_nodes "$NUM_NODES"); fi
if [ -n "${GPUS_PER_NODE:-}" ]; then args+=(--num_gpus "$GPUS_PER_NODE"); fi
deepspeed "${args[@]}" --no_local_rank --module "$MBDS_MODULE" pretrain "$run_file" "$@"
