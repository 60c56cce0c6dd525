#!/usr/bin/env bash
# The test suite, from a fresh machine: install into .venv, then run pytest on the CPU.
# GPU-marked tests skip without CUDA; on a GPU machine `pytest -m gpu` runs them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/setup.sh"
cd "$root"
exec python -m pytest -q "$@"
