"""Triton kernels for MosaicBERT, installed as mosaicbert_ds.kernels.

flash_attn: varlen FlashAttention with ALiBi (forward and backward).
fused:      GeGLU (+ dropout) and (bias +) dropout + residual + LayerNorm, forward and backward.
cross_entropy: the MLM loss without an fp32 copy of the logits.
"""

from .flash_attn import flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func

__all__ = ["flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func"]
