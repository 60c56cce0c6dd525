"""Elementwise pieces of a layer, with a fused Triton path on CUDA and PyTorch elsewhere.

geglu(h, p):                       h (..., 2*ff) -> Dropout_p(GELU(h[..., :ff]) * h[..., ff:])
dropout_add_layer_norm(x, r, ln):  LayerNorm(Dropout(x) + r)
linear_dropout_add_layer_norm(h, linear, r, ln):
                                   LayerNorm(Dropout(linear(h)) + r); fused, the linear's bias is
                                   added inside the LayerNorm kernel, whose backward then also
                                   yields the bias gradient (no separate column-sum pass)
cross_entropy(logits, labels):     the MLM loss; fused, without an fp32 copy of the logits

The PyTorch versions are the definition; the fused kernels (mosaicbert_ds.kernels.fused) must
match them and are chosen only when `fused` is True and the tensors live on a CUDA device.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F


def _gelu_approximate(act: str) -> str:
    return "tanh" if act == "gelu_tanh" else "none"


def _kernels(name: str = "fused"):
    """mosaicbert_ds.kernels.<name>, or None where Triton is not importable."""
    try:
        return importlib.import_module(f"mosaicbert_ds.kernels.{name}")
    except ImportError:
        return None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Mean cross-entropy over the labels that are not -100, computed in fp32."""
    if fused and logits.is_cuda and (k := _kernels("cross_entropy")) is not None:
        return k.cross_entropy(logits, labels)
    return F.cross_entropy(logits.float(), labels)


def geglu(h: torch.Tensor, act: str = "gelu", fused: bool = False, p: float = 0.0, training: bool = False
          ) -> torch.Tensor:
    """Gated GELU on the concatenated (gate, up) halves of the last dimension, then dropout."""
    if fused and h.is_cuda and (k := _kernels()) is not None:
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
                return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype),
                                    self.bias.to(dtype), self.eps)
        if x.dtype in (torch.bfloat16, torch.float16) and not self.low_precision:
            # A model held in bf16 (DeepSpeed's bf16 mode): fp32 LayerNorm means computing in fp32.
            return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)
        return super().forward(x)


def dropout_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, ln: LayerNorm, p: float,
                           training: bool, fused: bool = False) -> torch.Tensor:
    """LayerNorm(Dropout(x) + residual): the end of each post-LN sublayer."""
    if fused and x.is_cuda and (k := _kernels()) is not None:
        return k.dropout_add_layer_norm(x, residual, ln.weight, ln.bias, ln.eps, p if training else 0.0,
                                        low_precision=ln.low_precision)
    return ln(F.dropout(x, p=p, training=training) + residual)


def linear_dropout_add_layer_norm(h: torch.Tensor, linear: nn.Linear, residual: torch.Tensor, ln: LayerNorm,
                                  p: float, training: bool, fused: bool = False) -> torch.Tensor:
    """LayerNorm(Dropout(linear(h)) + residual): a projection closing a post-LN sublayer."""
    if fused and h.is_cuda and linear.bias is not None and (k := _kernels()) is not None:
        return k.dropout_add_layer_norm(F.linear(h, linear.weight), residual, ln.weight, ln.bias, ln.eps,
                                        p if training else 0.0, low_precision=ln.low_precision,
                                        linear_bias=linear.bias)
    return dropout_add_layer_norm(linear(h), residual, ln, p, training, fused)
