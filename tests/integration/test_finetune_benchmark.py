"""`python -m benchmarks.throughput --finetune` (`bench throughput --finetune`; benchmarks.glue_step)
as a CPU smoke run: the eager row of the GLUE step table is measured and written; the CUDA-graph
and compiled rows need a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_pair_batches_are_glue_batches_in_both_layouts():
    from benchmarks.glue_step import pair_batches
    from benchmarks.synthetic import FINETUNE

    batches = pair_batches(FINETUNE, 16, n_batches=2, vocab=1024)
    for b in batches:
        packed, padded = b["packed"], b["padded"]
        assert packed["cu_seqlens"].numel() == 17 and int(packed["cu_seqlens"][-1]) == b["tokens"]
        assert int(padded["attention_mask"].sum()) == b["tokens"] and padded["input_ids"].shape[0] == 16
        assert 8 <= packed["max_seqlen"] <= 120 and int(packed["input_ids"].max()) < 1024
        assert (packed["token_type_ids"] == 1).any() and torch.equal(packed["labels"], padded["labels"])
    assert batches[0]["tokens"] != batches[1]["tokens"]


def test_finetune_benchmark_smoke_run_on_cpu(tmp_path: Path):
    out = tmp_path / "finetune.json"
    argv = ["--finetune", "--preset", "tiny", "--device", "cpu", "--batch", "4", "--warmup", "1", "--steps", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.throughput", *argv, "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout
    assert "GLUE finetuning step (tiny, 3 classes" in printed
    assert "MosaicBERT-tiny cls @4, CUDA graphs: skipped (needs CUDA)" in printed
    assert "HF BERT cls @4, compiled: skipped (needs CUDA)" in printed
    result = json.loads(out.read_text())
    assert result["kind"] == "finetune" and result["device"] == "cpu" and result["provenance"]["command"]
    (row,) = result["rows"]
    assert row["name"] == "MosaicBERT-tiny cls @4, eager" and row["micro_batch"] == 4
    assert row["real_tokens_per_sec"] > 0 and row["mfu"] is None and row["baseline"] is None
    assert f"{row['name']:<36}{4:>6}{row['real_tokens_per_sec']:>13,.0f}" in printed
