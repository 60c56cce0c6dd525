"""mosaicbert_ds.ops.ResidualSplit's pieces on the CPU: the linear that adds a handed-over residual
gradient into its input gradient, and when the split stays off. The whole hand-over through the
fused LayerNorm kernel, alone and in the model, is tested in test_kernels.py (interpreter, GPU)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from mosaicbert_ds.ops import ResidualSplit, _Box, _Linear


def _linear_case(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(24, 16, generator=g, dtype=dtype).requires_grad_(True)
    b = torch.randn(24, generator=g, dtype=dtype).requires_grad_(True)
    return x, w, b, torch.randn(2, 5, 24, generator=g, dtype=dtype), torch.randn(2, 5, 16, generator=g)


def test_linear_adds_the_handed_over_residual_gradient():
    x, w, b, dy, res = _linear_case()
    box = _Box()
    y = _Linear.apply(x, w, b, box)
    torch.testing.assert_close(y, F.linear(x, w, b))
    assert box.take(res.clone())  # what the LayerNorm kernel's backward does before the linear's
    y.backward(dy)
    assert box.fused and box.grad is None
    torch.testing.assert_close(x.grad, res + dy @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, dy.flatten(0, 1).t() @ x.detach().flatten(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, dy.sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert not box.take(res)  # too late: the linear's backward ran, autograd must sum this one


def test_linear_without_a_residual_gradient_or_with_another_dtype():
    x, w, b, dy, res = _linear_case(torch.bfloat16)
    box = _Box()
    _Linear.apply(x, w, b, box).backward(dy)
    assert not box.fused
    torch.testing.assert_close(x.grad, dy @ w)
    x.grad = None
    box = _Box()
    y = _Linear.apply(x, w, b, box)
    box.take(res)  # fp32 (an fp32 LayerNorm's residual) against bf16 matmul gradients: added apart
    y.backward(dy)
    assert not box.fused and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), res + (dy @ w).float(), rtol=1e-2, atol=1e-2)


def test_linear_under_autocast_casts_like_autocast():
    for box in (_Box(), None):
        x, w, b, dy, _ = _linear_case()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = _Linear.apply(x, w, b, box)
            ref = F.linear(x, w, b)
        assert y.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(y, ref)
        y.float().backward(dy)
        grads = [t.grad for t in (x, w, b)]
        for t in (x, w, b):
            t.grad = None
        ref.float().backward(dy)  # autocast's own linear: bf16 gradients cast to the fp32 parameters
        for got, t in zip(grads, (x, w, b)):
            assert got.dtype == t.grad.dtype == torch.float32
            torch.testing.assert_close(got, t.grad, rtol=1e-2, atol=1e-2)


def test_split_is_off_without_kernels_or_gradients():
    x = torch.randn(3, 4, requires_grad=True)
    linear = nn.Linear(4, 4)
    assert ResidualSplit(x, fused=True).sink is None  # CPU: no fused kernels, nothing to hand over
    assert ResidualSplit(x, fused=False).sink is None
    split = ResidualSplit(x, fused=False)
    torch.testing.assert_close(split.linear(linear), linear(x))
