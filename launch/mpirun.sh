#!/usr/bin/env bash
# Open MPI or MPICH mpirun, one rank per GPU; ranks find their place through mpi4py
# (mosaicbert_ds/train/distributed.py), rank 0 names itself as MASTER_ADDR.
#   NP=8 launch/mpirun.sh RUN [key=value ...]                        # one node
#   HOSTFILE=launch/hostfile launch/mpirun.sh RUN [key=value ...]    # several: NP = all slots
# Optional: MPIRUN (default mpirun), MPIRUN_ARGS (extra flags, e.g. "--allow-run-as-root" or
# "--mca btl_tcp_if_include eth0" for Open MPI), MASTER_ADDR/MASTER_PORT (default: rank 0's
# hostname and a free port there).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
mbds_usage "$@"
run_file="$1"; shift
mpirun="${MPIRUN:-mpirun}"
python_bin="$(command -v "${PYTHON:-python}")"  # absolute: remote shells may not have the venv on PATH
read -r -a extra <<< "${MPIRUN_ARGS:-}"

np="${NP:-1}"
if [ -n "${HOSTFILE:-}" ]; then
  # a MASTER_ADDR given must resolve (without one, rank 0 names its own host)
  if [ -n "${MASTER_ADDR:-}" ]; then mbds_check_hostfile "$HOSTFILE" "$MASTER_ADDR"; else mbds_check_hostfile "$HOSTFILE"; fi
  np="${NP:-$HOSTFILE_SLOTS}"
fi
names=($(mbds_env_names) MASTER_ADDR MASTER_PORT)

if "$mpirun" --version 2>&1 | grep -q "Open MPI"; then
  args=(-np "$np" --bind-to none --map-by slot)  # no core binding: data loader workers need cores
  if [ -n "${HOSTFILE:-}" ]; then args+=(--hostfile "$HOSTFILE"); fi  # same "host slots=N" format
  for name in "${names[@]}"; do if [ -n "${!name+x}" ]; then args+=(-x "$name"); fi; done
else  # MPICH / hydra (also Intel MPI)
  args=(-n "$np")
  if [ -n "${HOSTFILE:-}" ]; then
    machinefile="$(mktemp "${TMPDIR:-/tmp}/mbds-machinefile.XXXXXX")"
    trap 'rm -f "$machinefile"' EXIT
    "$python_bin" -m mosaicbert_ds.train.hostfile --check "$HOSTFILE" --print mpich > "$machinefile"
    args+=(-f "$machinefile")
  fi
  for name in "${names[@]}"; do if [ -n "${!name+x}" ]; then args+=(-genv "$name" "${!name}"); fi; done
fi
"$mpirun" "${args[@]}" "${extra[@]}" "$python_bin" -u -m "$MBDS_MODULE" pretrain "$run_file" "$@"
