#!/usr/bin/env bash
# Refresh launch/constraints.txt, the tested versions that launch/setup.sh installs: resolve
# setup.cfg's ranges (with the dev extras) afresh in a throw-away venv and record every version.
# Then run `bash tests/run.sh` (it reinstalls from the new file) and commit the file if it passes.
#   bash launch/lock.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q "$root[dev]"
{
  echo "# Tested versions for launch/setup.sh (pip -c). Made by 'bash launch/lock.sh' with"
  echo "# $("$tmp/venv/bin/python" --version) on $(uname -m); setup.cfg keeps the ranges users install from."
  "$tmp/venv/bin/python" -m pip freeze --exclude mosaicbert_ds
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" "$root/launch/constraints.txt"
echo "wrote $root/launch/constraints.txt ($(grep -vc '^#' "$root/launch/constraints.txt") packages)"
