"""Attention on the packed token stream: ALiBi slopes, the varlen interface and its reference.

`flash_attn_varlen_func` has flash-attn's varlen signature plus `alibi_slopes`. It dispatches to
the Triton kernel (mosaicbert_ds.kernels) on CUDA and to `varlen_attention_reference`, an exact
pure-PyTorch implementation, elsewhere; the reference is also the kernel's test oracle.

Shapes: q, k, v are (total_tokens, heads, head_dim); cu_seqlens is int32 (batch + 1,) with
cu_seqlens[0] == 0 and cu_seqlens[-1] == total_tokens; the output is (total_tokens, heads, head_dim).
The ALiBi bias of head h between query i and key j of one sequence is -slope[h] * |i - j|.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops import triton_kernels


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The ALiBi slopes of Press et al. for `n_heads` heads, as float32 (n_heads,).

    For a power of two n: start = 2^(-8/n) and m_h = start^(h+1). Otherwise the slopes of the
    largest power of two c < n, followed by every other slope of the 2c-head sequence.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be positive, got {n_heads}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if n_heads & (n_heads - 1) == 0:
        slopes = power_of_two(n_heads)
    else:
        c = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(c) + power_of_two(2 * c)[0::2][: n_heads - c]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, seqlen_q: int, seqlen_k: int | None = None) -> torch.Tensor:
    """The dense ALiBi bias (heads, seqlen_q, seqlen_k): -slope * |i - j|."""
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    i = torch.arange(seqlen_q, device=slopes.device)
    j = torch.arange(seqlen_k, device=slopes.device)
    dist = (i[:, None] - j[None, :]).abs().to(slopes.dtype)
    return -slopes[:, None, None] * dist


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention over each sequence of a packed batch, never padding.

    Sequences of equal length are stacked and attended together, so the number of
    calls is the number of distinct lengths, not the number of sequences. Math is done in
    the inputs' dtype with a softmax in fp32 (or fp64); pass float64 inputs for an oracle.
    """
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("the reference supports self-attention only (cu_seqlens_q == cu_seqlens_k)")
    total, n_heads, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
    cu = cu_seqlens_q.long()
    seqlens = cu[1:] - cu[:-1]
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax, fp64 for an oracle
    out = torch.empty_like(q)
    for length in torch.unique(seqlens).tolist():
        if length == 0:
            continue
        starts = cu[:-1][seqlens == length]
        idx = (starts[:, None] + torch.arange(length, device=q.device)[None, :]).reshape(-1)
        # (n, L, H, D) -> (n, H, L, D)
        qs, ks, vs = (t[idx].view(-1, length, n_heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(qs, ks.transpose(-1, -2)).to(acc_dtype) * scale
        if alibi_slopes is not None:
            scores = scores + alibi_bias(alibi_slopes.to(scores.device, acc_dtype), length)
        if causal:
            mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        o = torch.matmul(probs, vs)  # (n, H, L, D)
        out[idx] = o.transpose(1, 2).reshape(-1, n_heads, head_dim)
    return out


def _triton_available(q: torch.Tensor) -> bool:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (32, 64, 128):
        return False
    return triton_kernels() is not None


@torch.compiler.disable  # a graph break: the Triton kernel is launched eagerly inside compiled layers
def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Varlen attention with optional ALiBi; impl is "auto", "triton" or "torch".

    "auto" takes the Triton kernel for CUDA bf16/fp16 inputs with head_dim 32/64/128 and no
    attention dropout (the kernel has none), and the PyTorch reference otherwise.
    """
    use_triton = impl == "triton" or (impl == "auto" and dropout_p == 0.0 and _triton_available(q))
    if use_triton:
        if dropout_p != 0.0:
            raise ValueError("the Triton attention kernel has no dropout; set attention_probs_dropout_prob=0")
        kernels = triton_kernels()
        if kernels is None:
            raise RuntimeError("impl='triton': the Triton kernels cannot be imported (is Triton installed?)")
        return kernels.flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            softmax_scale=softmax_scale,
            causal=causal,
            alibi_slopes=alibi_slopes,
        )
    return varlen_attention_reference(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=dropout_p,
        softmax_scale=softmax_scale,
        causal=causal,
        alibi_slopes=alibi_slopes,
    )


def padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention on a padded batch, (B, L, H, D) in and out, for the unpad=False ablation.

    `bias` is additive, broadcastable to (B, H, L, L): the key-padding mask, plus ALiBi if used.
    """
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias.to(q.dtype), dropout_p=dropout_p)
    return o.transpose(1, 2)
