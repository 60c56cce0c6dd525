#!/usr/bin/env bash
# Create .venv (once) and install mosaicbert_ds with its test extras into it.
# Sourced by launch/quickstart.sh and tests/run.sh; safe to run again.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MOSAICBERT_VENV:-$root/.venv}"
stamp="$venv/.mosaicbert-installed"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$root/setup.cfg" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$root[dev]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
