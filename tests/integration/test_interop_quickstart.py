"""Start from an existing model on the CPU: import a BERT, continue pretraining, export, reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mosaicbert_ds.cli", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from mosaicbert_ds.data import prepare_default_corpus

    return prepare_default_corpus(tmp_path_factory.mktemp("data") / "jargon", vocab_size=2048)


@pytest.mark.slow
def test_import_continue_pretraining_export_reload(dataset, tmp_path):
    tok = AutoTokenizer.from_pretrained(dataset / "tokenizer")
    torch.manual_seed(0)
    bert = BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
        )
    ).eval()
    bert.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")

    res = cli("import", tmp_path / "bert", tmp_path / "imported")
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "run"
    common = [
        "pretrain",
        "tiny-cpu",
        f"data.path={dataset}",
        f"output_dir={run}",
        "model.preset=",
        f"model.init_from={tmp_path / 'imported'}",
        "duration.steps=2",
        "eval.interval=0",
        "checkpoint.interval=0",
        "log.interval=1",
        "optimizer.lr=1e-12",
        "model.gradient_checkpointing=true",
    ]
    res = cli(*common[:4], "model.init_from=" + str(tmp_path / "imported"), "duration.steps=2")
    assert res.returncode == 2 and "conflicts with model.init_from" in res.stderr  # preset tiny != this BERT
    res = cli(*common)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/train" in r] == [1, 2]

    res = cli("export", run, tmp_path / "export")
    assert res.returncode == 0, res.stderr[-2000:]
    assert cli("export", run, run).returncode == 2
    # The export reloads in transformers and, with lr ~0, still computes the source BERT's logits.
    enc = tok(["the hacker wrote a kludge", "foo"], padding=True, return_tensors="pt")
    code = (
        "import sys, torch; sys.modules['mosaicbert_ds'] = None\n"
        "from transformers import AutoModelForMaskedLM, AutoTokenizer\n"
        f"m = AutoModelForMaskedLM.from_pretrained({str(tmp_path / 'export')!r}, trust_remote_code=True).eval()\n"
        f"enc = AutoTokenizer.from_pretrained({str(tmp_path / 'export')!r})(['the hacker wrote a kludge', 'foo'], "
        "padding=True, return_tensors='pt')\n"
        f"torch.save(m(**enc).logits.detach(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf")},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    with torch.no_grad():
        ref = bert(**enc).logits
    got = torch.load(tmp_path / "logits.pt")
    m = enc["attention_mask"].bool()
    assert (got[m] - ref[m]).abs().max() < 1e-4
