"""Interop on CUDA: an imported model through the Triton kernels, and an export run where
mosaicbert_ds is absent (skipped without CUDA; run on the H200 with `pytest -m gpu`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM, ops
from mosaicbert_ds.interop.import_command import import_folder
from mosaicbert_ds.train.export import export_checkpoint
from tests.helpers.layouts import hub_folder, hub_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LENGTHS = [128, 77, 1, 100, 33]


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    n = torch.tensor(LENGTHS)[:, None]
    pos = torch.arange(128)[None]
    mask = (pos < n).long()
    ids = torch.randint(5, vocab, (len(LENGTHS), 128), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": (pos >= n // 2).long() * mask}


def _rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool().cpu()
    a, b = a.double().cpu()[m], b.double().cpu()[m]
    return ((a - b).norm() / b.norm()).item()


def _logits(model: torch.nn.Module, batch: dict, impl: str, bf16: bool) -> torch.Tensor:
    for layer in model.bert.layers:  # attention kernel and fused elementwise ops, or PyTorch's
        layer.attention.impl = impl
    for module in model.modules():
        if hasattr(module, "fused"):
            module.fused = impl == "triton"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        return model(**{k: v.cuda() for k, v in batch.items()}).logits.float()


def test_an_imported_authors_model_runs_the_triton_kernels_within_bf16_rounding(tmp_path):
    """BERT-Base widths (12 heads), two layers, against the float64 forward of the authors' layout."""
    assert ops.triton_kernels() is not None, "the Triton kernels do not import on this GPU machine"
    sd, cfg, src = hub_folder(tmp_path, vocab=30528, d=768, heads=12, ff=3072, layers=2, eps=1e-12, std=0.02)
    import_folder(src, tmp_path / "out")
    model = MosaicBertForMaskedLM.from_pretrained(tmp_path / "out").cuda().eval()
    batch = _batch(30528)
    ref = hub_reference(sd, cfg, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    fp32 = _rel(_logits(model, batch, "torch", bf16=False), ref, batch["attention_mask"])
    torch_bf16 = _rel(_logits(model, batch, "torch", bf16=True), ref, batch["attention_mask"])
    triton_bf16 = _rel(_logits(model, batch, "triton", bf16=True), ref, batch["attention_mask"])
    print(f"relative error vs float64: fp32 {fp32:.1e}, PyTorch bf16 {torch_bf16:.1e}, Triton bf16 {triton_bf16:.1e}")
    assert fp32 < 1e-5
    assert triton_bf16 < 1.5 * torch_bf16 + 1e-4  # the kernels add no error beyond bf16's own


ELSEWHERE = textwrap.dedent("""
    import sys
    sys.modules["mosaicbert_ds"] = None  # any import of the package fails
    import torch
    from transformers import AutoModelForMaskedLM
    src, batch, out = sys.argv[1], torch.load(sys.argv[2]), sys.argv[3]
    model = AutoModelForMaskedLM.from_pretrained(src, trust_remote_code=True).cuda().eval()
    assert not type(model).__module__.startswith("mosaicbert_ds"), type(model).__module__
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.no_grad():
        fp32 = model(**batch).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(**batch).logits.float()
    torch.save({"fp32": fp32.cpu(), "bf16": bf16.cpu(), "device": str(next(model.parameters()).device)}, out)
""")


def test_an_export_runs_on_cuda_where_the_package_is_absent(tmp_path):
    config = MosaicBertConfig.from_name("base", num_hidden_layers=2)
    torch.manual_seed(0)
    MosaicBertForMaskedLM(config).save_pretrained(tmp_path / "model")
    out = export_checkpoint(tmp_path / "model", tmp_path / "export")
    batch = _batch(config.vocab_size)
    torch.save(batch, tmp_path / "batch.pt")
    run = subprocess.run(
        [sys.executable, "-c", ELSEWHERE, str(out), str(tmp_path / "batch.pt"), str(tmp_path / "res.pt")],
        cwd=tmp_path,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    res = torch.load(tmp_path / "res.pt")
    assert res["device"].startswith("cuda")
    model = MosaicBertForMaskedLM.from_pretrained(out).eval()
    with torch.no_grad():
        cpu = model(**batch).logits
    mask = batch["attention_mask"]
    triton_bf16 = _rel(_logits(model.cuda(), batch, "triton", bf16=True), cpu, mask)
    elsewhere_fp32, elsewhere_bf16 = _rel(res["fp32"], cpu, mask), _rel(res["bf16"], cpu, mask)
    print(
        f"relative error vs CPU fp32: elsewhere fp32 {elsewhere_fp32:.1e}, bf16 {elsewhere_bf16:.1e}; "
        f"with the package (Triton) bf16 {triton_bf16:.1e}"
    )
    assert elsewhere_fp32 < 1e-5
    assert elsewhere_bf16 < 2e-2 and triton_bf16 < 1.5 * elsewhere_bf16 + 1e-4
