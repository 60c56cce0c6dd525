"""The fused cross-entropy kernel (mosaicbert_ds.kernels.cross_entropy) against float64 PyTorch.

Set up like tests/kernels/test_kernels.py: without CUDA every test runs through Triton's interpreter
(TRITON_INTERPRET=1, set below before the kernel is imported) on small shapes, with a forced small
block so the multi-block path runs; in a whole-suite run where triton was imported first, they run
in a fresh process (test_in_fresh_interpreter). On a GPU every test runs compiled and carries the
`gpu` marker, and test_full_size_bf16 checks the MLM shape (M=8192, V=30528) without a host sync.

The reference is F.cross_entropy on the same input values in float64. The interpreter truncates
fp32 -> bf16 where the GPU rounds, which the bf16 gradient tolerance (1e-2) covers.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.triton_interp import DEVICE, ON_GPU, enter_interpreter, fresh_process_test, rel_err, runs_in_process

_INTERPRET_BEFORE = enter_interpreter()
IN_PROCESS = runs_in_process(_INTERPRET_BEFORE)


def _load_kernel():
    ce = importlib.import_module("mosaicbert_ds.kernels.cross_entropy")
    if IN_PROCESS and not ON_GPU:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(ce._ce_fwd_kernel, InterpretedFunction):  # imported earlier, compiled
            ce = importlib.reload(ce)
    return ce


ce = _load_kernel()
pytestmark = [pytest.mark.gpu] if ON_GPU else []
_interpreted_here, test_in_fresh_interpreter = fresh_process_test(__file__, IN_PROCESS, timeout=600)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_case(
    rows: int,
    vocab: int,
    dtype: torch.dtype,
    seed: int,
    ignore_every: int = 3,
    ignore_index: int = -100,
    scale: float = 4.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = (scale * torch.randn(rows, vocab, device=DEVICE, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (rows,), device=DEVICE, generator=g)
    if rows >= 2:  # the first and the last column, where the block masks are
        labels[-2], labels[-1] = 0, vocab - 1
    if ignore_every:
        labels[::ignore_every] = ignore_index
    return logits, labels


def run_both(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, dloss: float = 3.0):
    """(loss, grad) of the kernel and of float64 PyTorch, both from (loss * dloss).backward()."""
    x = logits.detach().clone().requires_grad_(True)
    loss = ce.cross_entropy(x, labels, ignore_index)
    (loss * dloss).backward()
    x64 = logits.detach().double().requires_grad_(True)
    ref = F.cross_entropy(x64, labels, ignore_index=ignore_index)
    (ref * dloss).backward()
    return loss, x.grad, ref.detach(), x64.grad


def check(logits, labels, ignore_index=-100, dloss=3.0):
    dtype = logits.dtype
    loss, grad, ref, ref_grad = run_both(logits, labels, ignore_index, dloss)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert abs(loss.item() - ref.item()) <= LOSS_TOL[dtype] * abs(ref.item()), (loss.item(), ref.item())
    err = rel_err(grad, ref_grad)
    assert err <= GRAD_TOL[dtype], f"grad: {err:.2e}"
    ignored = labels == ignore_index
    assert (grad[ignored] == 0).all(), "ignored rows must get a zero gradient"


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_small_vocab_multi_block(dtype, monkeypatch):
    """V=1000 in blocks of 256: four blocks, the last partial."""
    monkeypatch.setattr(ce, "_BLOCK", 256)
    check(*make_case(37, 1000, dtype, seed=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bert_vocab(dtype):
    """V=30528 with the default block (not a multiple of it), a few rows."""
    check(*make_case(4, 30528, dtype, seed=2, ignore_every=4))


def test_grad_output_and_ignore_index(monkeypatch):
    """Another ignore_index and a negative d loss, in a single block."""
    logits, labels = make_case(9, 300, torch.bfloat16, seed=3, ignore_every=2, ignore_index=-1)
    check(logits, labels, ignore_index=-1, dloss=-0.25)


def test_all_ignored_is_nan_with_zero_grad():
    logits, labels = make_case(5, 700, torch.bfloat16, seed=4, ignore_every=1)
    loss, grad, ref, ref_grad = run_both(logits, labels)
    assert math.isnan(ref.item()) and math.isnan(loss.item()), "PyTorch gives nan when every label is ignored"
    assert (grad == 0).all() and (ref_grad == 0).all()


def test_empty_batch_launches_nothing(monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("no kernel should be launched for M == 0")

    monkeypatch.setattr(ce, "_ce_fwd_kernel", NoLaunch())
    monkeypatch.setattr(ce, "_ce_bwd_kernel", NoLaunch())
    x = torch.zeros(0, 30528, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = ce.cross_entropy(x, labels)
    ref = F.cross_entropy(x.detach().float(), labels)
    assert math.isnan(loss.item()) and math.isnan(ref.item())
    loss.backward()
    assert x.grad.shape == (0, 30528)


def test_strided_rows(monkeypatch):
    """A column slice of a wider buffer (stride(0) != V) is read in place; a transposed one is copied."""
    monkeypatch.setattr(ce, "_BLOCK", 128)
    wide, labels = make_case(11, 530, torch.bfloat16, seed=5)
    view = wide[:, 7:507]
    labels = labels.clamp_max(499)
    assert view.stride() == (530, 1)
    check(view, labels)
    t = wide[:, :11].t()  # (11, 11) with stride(-1) != 1
    check(t, labels[:11].clamp_max(10))


def test_extreme_logits_are_finite():
    g = torch.Generator(device=DEVICE).manual_seed(6)
    logits = 1e4 * torch.sign(torch.randn(6, 1000, device=DEVICE, generator=g))
    logits[0] = -1e4  # a row of equal minima
    labels = torch.tensor([3, -100, 0, 999, 17, 500], device=DEVICE)
    labels[2] = int(logits[2].argmin())  # loss 2e4 on this row
    loss, grad, ref, ref_grad = run_both(logits, labels)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    # only the fp32 logsumexp is kept for backward: at |lse| ~ 1e4 its rounding (half an ulp,
    # 4.9e-4) becomes the relative error of softmax = exp(x - lse); seen 1.2e-5 on an H200
    assert rel_err(grad, ref_grad) <= 1e-3


def test_out_of_range_label_gives_nan():
    logits, labels = make_case(4, 100, torch.float32, seed=7, ignore_every=0)
    labels[2] = 100
    assert math.isnan(ce.cross_entropy(logits, labels).item())


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_full_size_bf16():
    """The MLM loss at its real size, with no host sync in forward or backward."""
    logits, labels = make_case(8192, 30528, torch.bfloat16, seed=8, ignore_every=97)
    x = logits.clone().requires_grad_(True)
    dloss = torch.tensor(3.0, device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = ce.cross_entropy(x, labels)
        loss.backward(dloss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x64 = logits.double().requires_grad_(True)
    ref = F.cross_entropy(x64, labels)
    ref.backward(dloss.double())
    assert abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item()), (loss.item(), ref.item())
    err = rel_err(x.grad, x64.grad)
    assert err <= 1e-2, f"grad: {err:.2e}"
    assert (x.grad[labels == -100] == 0).all()
