#!/usr/bin/env bash
# The main job on the bundled corpus, from a fresh machine: install, train a tokenizer, convert
# the corpus to MDS shards, pretrain a small MosaicBERT for a few minutes on whatever is here
# (CPU, one GPU, or all GPUs), write TensorBoard logs and a checkpoint, export it, summarise.
#   bash launch/quickstart.sh [OUT_DIR] [key=value ...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/setup.sh"
cd "$root"
exec mosaicbert-ds quickstart "$@"
