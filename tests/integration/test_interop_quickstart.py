"""Start from an existing model on the CPU: import a BERT, continue pretraining, export, reload."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from tests.helpers.runs import cli, metrics_rows


@pytest.mark.slow
def test_import_continue_pretraining_export_reload(jargon_data_2048, tmp_path):
    tok = AutoTokenizer.from_pretrained(jargon_data_2048 / "tokenizer")
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
        f"data.path={jargon_data_2048}",
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
    assert [r["step"] for r in metrics_rows(run) if "loss/train" in r] == [1, 2]

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
