"""Triton kernels for MosaicBERT, installed as mosaicbert_ds.kernels.

flash_attn: varlen FlashAttention with ALiBi (forward and backward).
fused:      GeGLU and dropout + residual + LayerNorm, forward and backward.
"""

from .flash_attn import flash_attn_varlen_func, flash_attn_varlen_qkvpacked_func

__all__ = ["flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func"]
