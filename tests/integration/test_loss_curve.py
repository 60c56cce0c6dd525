"""Loss-curve regression: a fixed-seed run must reproduce the committed per-step losses.

CPU: the tiny model on the bundled Jargon File (tokenizer and dataset built here, deterministically),
against tests/data/loss_curves/cpu_tiny.json. GPU: MosaicBERT-Base in bf16 on the prose corpus
(benchmarks/prose_corpus.py, at PROSE_MDS or runs/prose/mds) against gpu_base.json.
Regenerate a reference with `python -m benchmarks.loss_curve ... --out FILE` after a change that
is meant to alter the curve, and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from benchmarks.loss_curve import compare, data_identity, run_once
from tests.helpers.data import convert_docs, jargon_docs, tokenizer_dir

REFERENCES = Path(__file__).resolve().parents[1] / "data" / "loss_curves"
REPO = Path(__file__).resolve().parents[2]


def build_cpu_dataset(tmp: Path, tmp_path_factory=None) -> Path:
    """The reference's dataset: 1500 Jargon paragraphs (100 held out), the session tokenizer."""
    return convert_docs(tmp, jargon_docs(1500), name="curve", val_docs=100)


@pytest.mark.slow
def test_cpu_loss_curve_matches_reference(tmp_path_factory, tmp_path: Path) -> None:
    reference = json.loads((REFERENCES / "cpu_tiny.json").read_text())
    tokenizer_dir(tmp_path_factory)
    data = build_cpu_dataset(tmp_path_factory.mktemp("curve"))
    assert data_identity(str(data)) == reference["data"]  # the shipped tokenizer: the same token ids
    losses = run_once(str(data), "cpu-tiny", tmp_path, [])
    problems = compare(reference, losses, data_identity(str(data)))
    assert not problems, "\n".join(problems) + f"\nnew losses: {losses}"


def test_compare_flags_a_worse_curve() -> None:
    reference = json.loads((REFERENCES / "cpu_tiny.json").read_text())
    same = reference["runs"][0]
    assert compare(reference, same) == []
    worse = [x + 0.05 for x in same]
    assert compare(reference, worse)  # a model that learns 0.05 nats worse fails
    assert compare(reference, same[:-1])  # a different step count fails
    other = {**reference["data"], "vocab_sha256": "0" * 64}
    assert "another dataset" in compare(reference, same, other)[0]  # another tokenizer fails


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_loss_curve_matches_reference(tmp_path: Path) -> None:
    reference = json.loads((REFERENCES / "gpu_base.json").read_text())
    data = Path(os.environ.get("PROSE_MDS", REPO / "runs" / "prose" / "mds"))
    assert (data / "mosaicbert_index.json").is_file(), (
        f"build the corpus first: python -m benchmarks.prose_corpus --out {data.parent}"
    )
    losses = run_once(str(data), "gpu-base", tmp_path, [])
    problems = compare(reference, losses, data_identity(str(data)))
    assert not problems, "\n".join(problems)
