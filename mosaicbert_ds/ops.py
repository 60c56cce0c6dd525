"""Elementwise pieces of a layer, with a fused Triton path on CUDA and PyTorch elsewhere.

geglu(h, p):                       h (..., 2*ff) -> Dropout_p(GELU(h[..., :ff]) * h[..., ff:])
dropout_add_layer_norm(x, r, ln):  LayerNorm(Dropout(x + linear_bias) + r), linear_bias optional
linear_dropout_add_layer_norm(h, linear, r, ln):
                                   LayerNorm(Dropout(linear(h)) + r); fused, the linear's bias is
                                   added inside the LayerNorm kernel, whose backward then also
                                   yields the bias gradient (no separate column-sum pass)
                                   and, under autocast, the fp32 weight gradient comes straight
                                   from the matmul (no cast kernel)
cross_entropy(logits, labels):     the MLM loss; fused, without an fp32 copy of the logits
ResidualSplit(x, fused):           x feeding a sublayer's first linear and, as the residual, its
                                   closing LayerNorm; fused, the linear's input-gradient matmul
                                   adds the residual's gradient (no separate add kernel)

The PyTorch versions are the definition; the fused kernels (mosaicbert_ds.kernels.fused) must
match them and are chosen only when `fused` is True and the tensors live on a CUDA device.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F


def _gelu_approximate(act: str) -> str:
    return "tanh" if act == "gelu_tanh" else "none"


@functools.cache
def triton_kernels() -> ModuleType | None:
    """The Triton kernels (mosaicbert_ds.kernels: flash_attn, fused, cross_entropy), or None where
    they cannot be imported (no Triton). The one availability check for every kernel user."""
    try:
        from mosaicbert_ds import kernels
        from mosaicbert_ds.kernels import cross_entropy, fused  # noqa: F401
    except ImportError:
        return None
    return kernels


def kernels_for(t: torch.Tensor, fused: bool, name: str = "fused") -> ModuleType | None:
    """The kernel module to run on tensors like t: only when asked (`fused`), on CUDA, with Triton."""
    if not (fused and t.is_cuda) or (kernels := triton_kernels()) is None:
        return None
    return getattr(kernels, name)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Mean cross-entropy over the labels that are not -100, computed in fp32."""
    if (k := kernels_for(logits, fused, "cross_entropy")) is not None:
        return k.cross_entropy(logits, labels)
    return F.cross_entropy(logits.float(), labels)


def geglu(
    h: torch.Tensor, act: str = "gelu", fused: bool = False, p: float = 0.0, training: bool = False
) -> torch.Tensor:
    """Gated GELU on the concatenated (gate, up) halves of the last dimension, then dropout."""
    if (k := kernels_for(h, fused)) is not None:
        return k.geglu(h, approximate=_gelu_approximate(act), p=p if training else 0.0)
    gate, up = h.chunk(2, dim=-1)
    return F.dropout(F.gelu(gate, approximate=_gelu_approximate(act)) * up, p=p, training=training)


def gelu(h: torch.Tensor, act: str = "gelu") -> torch.Tensor:
    return F.gelu(h, approximate=_gelu_approximate(act))


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in bf16/fp16 (`low_precision`) or in fp32.

    Under autocast, LayerNorm is normally upcast to fp32; the paper's low-precision LayerNorm
    stays in the autocast dtype, which matters because LayerNorm is bandwidth-bound. In a model
    whose weights are bf16 (DeepSpeed's bf16 mode, no autocast), low_precision=False computes in
    fp32 and casts the result back, so the ablation means the same in both precision modes.
    """

    def __init__(self, hidden_size: int, eps: float, low_precision: bool = False) -> None:
        super().__init__(hidden_size, eps=eps)
        self.low_precision = low_precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            if not self.low_precision:
                return super().forward(x)  # autocast runs it in fp32
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return F.layer_norm(
                    x.to(dtype), self.normalized_shape, self.weight.to(dtype), self.bias.to(dtype), self.eps
                )
        if x.dtype in (torch.bfloat16, torch.float16) and not self.low_precision:
            # A model held in bf16 (DeepSpeed's bf16 mode): fp32 LayerNorm means computing in fp32.
            return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(
                x.dtype
            )
        return super().forward(x)


def dropout_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    ln: LayerNorm,
    p: float,
    training: bool,
    fused: bool = False,
    residual_sink: _Box | None = None,
    linear_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(Dropout(x + linear_bias) + residual): the end of each post-LN sublayer.
    residual_sink: see ResidualSplit (used by the fused kernel only)."""
    if (k := kernels_for(x, fused)) is not None:
        return k.dropout_add_layer_norm(
            x,
            residual,
            ln.weight,
            ln.bias,
            ln.eps,
            p if training else 0.0,
            low_precision=ln.low_precision,
            linear_bias=linear_bias,
            residual_sink=residual_sink,
        )
    if linear_bias is not None:
        x = x + linear_bias
    return ln(F.dropout(x, p=p, training=training) + residual)


def linear_dropout_add_layer_norm(
    h: torch.Tensor,
    linear: nn.Linear,
    residual: torch.Tensor,
    ln: LayerNorm,
    p: float,
    training: bool,
    fused: bool = False,
    residual_sink: _Box | None = None,
) -> torch.Tensor:
    """LayerNorm(Dropout(linear(h)) + residual): a projection closing a post-LN sublayer. Fused,
    the linear's bias is added inside the LayerNorm kernel (its gradient comes from that backward)."""
    if linear.bias is not None and kernels_for(h, fused) is not None:
        x = _Linear.apply(h, linear.weight, None, None)
        return dropout_add_layer_norm(x, residual, ln, p, training, fused, residual_sink, linear_bias=linear.bias)
    return dropout_add_layer_norm(linear(h), residual, ln, p, training, fused, residual_sink)


class _Box:
    """The residual's gradient on its way from the sublayer's closing LayerNorm to its first linear."""

    __slots__ = ("grad", "linear_done", "fused")

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None
        self.linear_done = False
        self.fused = False  # set when the linear's backward took the residual gradient in

    def take(self, grad: torch.Tensor) -> bool:
        """Called by the LayerNorm kernel's backward with a gradient buffer it allocated and hands
        over: True when kept for the linear (the kernel then returns no residual gradient), False
        when the linear's backward already ran (autograd sums the two as usual)."""
        if self.linear_done:
            return False
        self.grad = grad
        return True


_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(..., out_dtype=) on CUDA (torch >= 2.8)


def _mm_as(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b written as `dtype`: under autocast, fp32 weight gradients straight from the bf16 matmul
    (cuBLAS accumulates in fp32 anyway), where autograd would otherwise add a cast kernel."""
    if dtype != a.dtype and a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


class _Linear(torch.autograd.Function):
    """F.linear with autocast's casts inside, and gradients in the parameters' own dtype straight
    from the matmul and the column sum (no cast kernels). With a box, the input gradient is the
    residual's gradient + dY @ W, one in-place addmm (see ResidualSplit)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, box: _Box | None
    ) -> torch.Tensor:
        ctx.param_dtypes = weight.dtype, (bias.dtype if bias is not None else None)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # what autocast's linear does: cast, then bf16 math
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.box = box
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        box = ctx.box
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            res = None
            if box is not None:
                res, box.grad = box.grad, None
            if res is not None and res.dtype == dy2.dtype and res.is_contiguous():
                # the buffer is the LayerNorm kernel's own (Box.take): safe to add into in place
                dx = res.view(-1, weight.shape[1]).addmm_(dy2, weight).view(x.shape)
                box.fused = True
            else:
                dx = (dy2 @ weight).view(x.shape)
                if res is not None:  # an fp32 residual under autocast: no mixed-dtype addmm
                    dx = res + dx
            if box is not None:
                box.linear_done = True
        w_dtype, b_dtype = ctx.param_dtypes
        if ctx.needs_input_grad[1]:
            dw = _mm_as(dy2.t(), x.reshape(-1, x.shape[-1]), w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            db = dy2.sum(0, dtype=b_dtype)
        return dx, dw, db, None


class ResidualSplit:
    """x at the start of a post-LN sublayer: it feeds the sublayer's first linear and, as the
    residual, the LayerNorm that closes it. Autograd would sum x's two gradients with an extra
    elementwise kernel (two per layer). With the fused kernels, the LayerNorm kernel's backward
    hands its residual gradient to the linear (`sink`), whose input-gradient matmul adds into it
    in place (addmm_, beta = 1). Autograd runs the LayerNorm's backward first: the linear's output
    flows into it. Only while gradients are recorded; elsewhere linear() is linear(x) and sink None.
    """

    def __init__(self, x: torch.Tensor, fused: bool) -> None:
        self.x = x
        on = kernels_for(x, fused) is not None and torch.is_grad_enabled() and x.requires_grad
        self.sink = _Box() if on else None

    def linear(self, layer: nn.Linear) -> torch.Tensor:
        if self.sink is None:
            return layer(self.x)
        return _Linear.apply(self.x, layer.weight, layer.bias, self.sink)
