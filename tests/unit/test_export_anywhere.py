"""An exported folder loads with transformers alone (trust_remote_code), and gives the same logits."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForTokenClassification, BertTokenizerFast

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM
from mosaicbert_ds.errors import UserError
from mosaicbert_ds.model import MosaicBertForQuestionAnswering, MosaicBertForTokenClassification
from mosaicbert_ds.train.export import export_checkpoint

# What runs where mosaicbert_ds cannot be imported: plain transformers and the folder's own files.
ELSEWHERE = textwrap.dedent("""
    import sys
    sys.modules["mosaicbert_ds"] = None  # any import of the package fails
    import json, torch
    from transformers import (AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification, AutoModelForQuestionAnswering, pipeline)
    src, out = sys.argv[1], sys.argv[2]
    batch = torch.load(sys.argv[3])
    mlm = AutoModelForMaskedLM.from_pretrained(src, trust_remote_code=True).eval()
    assert not type(mlm).__module__.startswith("mosaicbert_ds"), type(mlm).__module__
    with torch.no_grad():
        logits = mlm(**batch).logits
        hidden = AutoModel.from_pretrained(src, trust_remote_code=True).eval()(**batch).last_hidden_state
    cls = AutoModelForSequenceClassification.from_pretrained(src, num_labels=3, trust_remote_code=True)
    AutoModelForTokenClassification.from_pretrained(src, num_labels=5, trust_remote_code=True)
    AutoModelForQuestionAnswering.from_pretrained(src, trust_remote_code=True)
    fill = pipeline("fill-mask", model=src, trust_remote_code=True)
    preds = fill("t5 t6 [MASK] t7")
    torch.save({"logits": logits, "hidden": hidden, "n_preds": len(preds),
                "cls": cls(**batch).logits.shape}, out)
""")


def _tiny_model_folder(tmp_path, **overrides):
    config = MosaicBertConfig.from_name("tiny", vocab_size=64, **overrides)
    torch.manual_seed(0)
    model = MosaicBertForMaskedLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    src = tmp_path / "model"
    model.save_pretrained(src)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"t{i}" for i in range(59)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(src)
    return model, src


def _batch():
    ids = torch.tensor([[2, 7, 8, 9, 10, 3], [2, 11, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    tt = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt}


def test_export_loads_with_transformers_alone(tmp_path):
    model, src = _tiny_model_folder(tmp_path)
    out = export_checkpoint(src, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" in cfg and "attention_impl" not in cfg and "fused_ops" not in cfg
    assert cfg["tokenizer_class"].startswith("BertTokenizer")  # for pipeline() on older transformers
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    torch.save(_batch(), tmp_path / "batch.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", ELSEWHERE, str(out), str(tmp_path / "res.pt"), str(tmp_path / "batch.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = torch.load(tmp_path / "res.pt")
    with torch.no_grad():
        ref = model(**_batch()).logits
    m = _batch()["attention_mask"].bool()
    assert (res["logits"][m] - ref[m]).abs().max() < 1e-5
    assert res["hidden"].shape == (2, 6, 64) and res["n_preds"] == 5 and tuple(res["cls"]) == (2, 3)


def test_export_with_the_package_needs_no_remote_code(tmp_path):
    model, src = _tiny_model_folder(tmp_path)
    out = export_checkpoint(src, tmp_path / "export")
    loaded = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(loaded) is MosaicBertForMaskedLM
    assert isinstance(
        AutoModelForTokenClassification.from_pretrained(out, num_labels=3), MosaicBertForTokenClassification
    )
    with torch.no_grad():
        assert torch.equal(loaded(**_batch()).logits, model(**_batch()).logits)
    with pytest.raises(UserError, match="holds the input"):
        export_checkpoint(src, src)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="refusing to replace"):
        export_checkpoint(src, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("unpad", [True, False])
def test_heads_hidden_states_and_gradient_checkpointing(tmp_path, unpad):
    config = MosaicBertConfig.from_name("tiny", vocab_size=64, unpad=unpad, hidden_dropout_prob=0.0)
    batch = _batch()
    torch.manual_seed(0)
    tok = MosaicBertForTokenClassification(MosaicBertConfig.from_name("tiny", vocab_size=64, unpad=unpad, num_labels=5))
    out = tok(**batch, labels=torch.where(batch["attention_mask"].bool(), 1, -100), output_hidden_states=True)
    assert out.logits.shape == (2, 6, 5) and len(out.hidden_states) == config.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (2, 6, 64)
    qa = MosaicBertForQuestionAnswering(config)
    qa_out = qa(**batch, start_positions=torch.tensor([1, 1]), end_positions=torch.tensor([2, 1]))
    assert qa_out.start_logits.shape == (2, 6) and torch.isfinite(qa_out.loss)
    mlm = MosaicBertForMaskedLM(config).train()
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -100)
    mlm(**batch, labels=labels).loss.backward()
    plain = [p.grad.clone() for p in mlm.parameters()]
    mlm.zero_grad()
    mlm.gradient_checkpointing_enable()
    assert mlm.bert.gradient_checkpointing
    mlm(**batch, labels=labels).loss.backward()
    for a, p in zip(plain, mlm.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)
