#!/usr/bin/env bash
# Create .venv (once) and install mosaicbert_ds with its test extras into it, at the tested
# versions of launch/constraints.txt (refreshed by `bash launch/lock.sh`; MOSAICBERT_UNPINNED=1
# installs from setup.cfg's ranges instead). Sourced by launch/quickstart.sh and tests/run.sh;
# safe to run again: it reinstalls when setup.cfg or the constraints change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MOSAICBERT_VENV:-$root/.venv}"
stamp="$venv/.mosaicbert-installed"
pins=(-c "$root/launch/constraints.txt")
[ "${MOSAICBERT_UNPINNED:-0}" = 1 ] && pins=()
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/setup.cfg" -nt "$stamp" ] || [ "$root/launch/constraints.txt" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${pins[@]}" -e "$root[dev]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
