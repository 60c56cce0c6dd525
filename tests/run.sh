#!/usr/bin/env bash
# The test suite, from a fresh machine: install into .venv, then run pytest on the CPU.
# Without arguments the suite runs in two pytest-xdist workers, one test module each at a time
# (MOSAICBERT_TEST_WORKERS sets how many); with arguments they go to pytest as they are.
# GPU-marked tests skip without CUDA; on a GPU machine `pytest -m gpu` runs them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/setup.sh"
cd "$root"
if [ $# -eq 0 ]; then
  set -- -n "${MOSAICBERT_TEST_WORKERS:-2}" --dist loadfile
fi
exec python -m pytest -q "$@"
