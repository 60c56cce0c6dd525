#!/usr/bin/env bash
# Single-GPU smoke test of the real trainer: MosaicBERT-Base on the bundled corpus for a few hundred
# steps (bf16, DeepSpeed ZeRO-1, Triton attention), then the loss curve and throughput it logged.
#   bash launch/smoke_gpu.sh [OUT_DIR] [key=value ...]
set -euo pipefail
out="${1:-runs/smoke_gpu}"; shift || true
python="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
# MBDS_DISABLE_NVLS=1: NVLink SHARP / multicast off, as in launch/env.sh
if [ "${MBDS_DISABLE_NVLS:-0}" = 1 ]; then export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1; fi
"$python" -c "import sys; from mosaicbert_ds.data import prepare_default_corpus; prepare_default_corpus(sys.argv[1])" "$out/data"
"$python" -m mosaicbert_ds.cli pretrain quickstart-gpu "data.path=$out/data" "output_dir=$out/run" \
    duration.steps=300 batch.global_batch=256 batch.micro_batch=128 log.interval=20 eval.interval=150 \
    checkpoint.interval=0 "$@"
"$python" - "$out/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if "loss/train" in r]
print(f"\n{'step':>6}{'loss':>9}{'real tok/s':>14}{'MFU':>8}{'step ms':>9}")
for r in train:
    mfu = f"{r['throughput/mfu']:.1%}" if "throughput/mfu" in r else "-"
    print(f"{r['step']:>6}{r['loss/train']:>9.3f}{r['throughput/tokens_per_sec']:>14,.0f}{mfu:>8}"
          f"{r['throughput/step_time_sec'] * 1e3:>9.1f}")
PY
