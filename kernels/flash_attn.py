"""Varlen FlashAttention with ALiBi in Triton: forward and backward on the packed token stream.

Supports
    q, k, v (total_tokens, heads, head_dim), bf16 or fp16, head_dim 32, 64 or 128, any token and
    head strides (the last dimension must be contiguous: views such as qkv.unbind(1) of a
    (T, 3, H, D) tensor are read in place, never copied); self-attention on a packed batch
    (cu_seqlens_q == cu_seqlens_k); bidirectional or causal (top-left: key j <= query i);
    ALiBi bias -slope[h] * |i - j| (slopes fp32 (heads,)); sequences of any length >= 1 (GPU
    tests up to 8192 tokens); gradients for q, k, v. q, k, v that are exactly the three
    slices of one (T, 3, H, D) tensor (the model's QKV projection), and
    flash_attn_varlen_qkvpacked_func, get one packed dqkv written in place by the kernels.
Limits
    No attention dropout (dropout_p must be 0). max_seqlen must be >= every sequence's length:
    as in flash-attn it sizes the grid and is not checked against cu_seqlens (that would sync).
    Token offsets are int64; positions within a sequence int32.
Algorithm
    Forward: one program per (head, sequence, query block), heads fastest; programs past a
    sequence's end exit at once. Online softmax in base 2 (softmax scale and slopes carry
    log2(e)); the ALiBi term is -|slope*i - slope*j| (no int->float per element); the base-2
    logsumexp (heads, total) fp32 is saved. Key blocks every query may see run unmasked.
    Backward: one program per (head, sequence, key block) accumulates dK and dV over the query
    blocks. dQ comes one of three ways, chosen per length bucket: "store" (the whole sequence
    fits one key block, so each query block is visited once: dQ is stored directly and
    delta = sum_j P dP comes from the tile itself, without reading O: one launch, no atomics),
    "atomic" (fp32 atomics into a dQ buffer, delta = rowsum(dO * O) from a small kernel) or
    "kernel" (a separate dQ kernel over key blocks, which also writes delta, then dK/dV).
    ALiBi reach (MOSAICBERT_FLASH_ALIBI_REACH=1, from max_seqlen 512): the bias -slope*|i - j|
    outgrows any score q.k at some distance, so far key blocks add nothing that fp32 can hold.
    A pass over q and k first takes, per head and sequence, the largest |q| and |k| (and, for the
    backward, the smallest logsumexp). With |q||k| bounding every raw score, and a row's own
    diagonal score (forward) or logsumexp (backward) bounding its maximum from below, each program
    computes the distance beyond which every score is ALIBI_SKIP_BITS (40) powers of two below
    its row's maximum, and visits only the key (or query) blocks within it. Skipped terms are each
    below 2^-40 of the largest one. Steep heads (slope 1/2: a few hundred tokens) skip most of a
    long sequence; gentle ones (1/256) skip nothing below several thousand tokens.
    Block sizes and the dQ mode are picked per (head_dim, dtype, causal, alibi, reach, power-of-two
    bucket of max_seqlen) by timing a few candidates on first use (set MOSAICBERT_FLASH_TUNE=0
    to take the first; MOSAICBERT_FLASH_CANDIDATES=wide times a wide grid too, for sweeps with
    benchmarks/attention.py); under TRITON_INTERPRET=1 the first candidate is used.
Tested
    Triton's interpreter on CPU (triton 3.6 and 3.8, tests/kernels/test_kernels.py); compiled on one
    NVIDIA H200 (triton 3.6, torch 2.11): every candidate configuration against float64, and timed
    by benchmarks/attention.py (figures in docs/kernels.md).
Known risks
    A max_seqlen below a real length silently leaves rows unwritten. Atomic dQ is not bitwise
    deterministic. Tuning runs the kernels several times on first use of a bucket (warm up
    before capturing a CUDA graph). At short lengths (128 tokens) an eager call is bound by host
    overhead (Python, Triton's launcher, the autograd engine) rather than GPU time; in a full
    training step the host runs ahead and hides it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# Token counts and block counts change with every batch and feed only scalar index math, so they are
# kept out of Triton's integer specialisation (do_not_specialize): one compile serves all batches.


@triton.jit
def _program_tile(CU, n_heads, n_blocks, BLOCK: tl.constexpr):
    """This program's head, sequence start (int64), sequence length, block start and sequence.

    Heads vary fastest, so programs running together read neighbouring bytes of the same tokens.
    """
    pid = tl.program_id(0)
    h = pid % n_heads
    rest = pid // n_heads
    seq = rest // n_blocks
    start = tl.load(CU + seq)
    seqlen = tl.load(CU + seq + 1) - start
    return h, start.to(tl.int64), seqlen, (rest % n_blocks) * BLOCK, seq


@triton.jit
def _reach(bound, floor, slope, seqlen, skip_bits):
    """Distance (int32, >= 1) beyond which ALiBi makes a score at least `skip_bits` (base 2) below
    the row's maximum: `bound` is an upper bound of the raw score q.k (scaled, base 2) of the
    pairs concerned, `floor` a lower bound of the rows' maximum (or logsumexp). Capped at the
    sequence length (no reach limit); a NaN (inf - inf) means no limit too."""
    radius = (bound - floor + skip_bits) / slope
    radius = tl.where(radius == radius, radius, seqlen.to(tl.float32))
    radius = tl.minimum(tl.maximum(radius, 0.0), seqlen.to(tl.float32))
    return radius.to(tl.int32) + 1


@triton.jit(do_not_specialize=["stride_lh", "n_seqs"])
def _seq_stats_kernel(
    Q,
    K,
    LSE,
    STATS,
    CU,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_lh,
    n_heads,
    n_seqs,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    WITH_LSE: tl.constexpr,
):
    """Per (head, sequence): the largest |q| and |k| and, with WITH_LSE, the smallest logsumexp:
    STATS (3, heads, sequences) fp32, for the ALiBi reach of every program (_reach)."""
    pid = tl.program_id(0)
    h = pid % n_heads
    seq = pid // n_heads
    start = tl.load(CU + seq).to(tl.int64)
    seqlen = tl.load(CU + seq + 1) - tl.load(CU + seq)
    offs_d = tl.arange(0, HEAD_DIM)
    qmax = tl.zeros([BLOCK_T], dtype=tl.float32)
    kmax = tl.zeros([BLOCK_T], dtype=tl.float32)
    lmin = tl.full([BLOCK_T], float("inf"), dtype=tl.float32)
    for t0 in range(0, seqlen, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = offs_t < seqlen
        rows = (start + offs_t)[:, None]
        q = tl.load(Q + rows * stride_qt + h * stride_qh + offs_d[None, :], mask=ok[:, None], other=0.0)
        k = tl.load(K + rows * stride_kt + h * stride_kh + offs_d[None, :], mask=ok[:, None], other=0.0)
        qmax = tl.maximum(qmax, tl.sqrt(tl.sum(q.to(tl.float32) * q.to(tl.float32), 1)))
        kmax = tl.maximum(kmax, tl.sqrt(tl.sum(k.to(tl.float32) * k.to(tl.float32), 1)))
        if WITH_LSE:
            lse = tl.load(LSE + h * stride_lh + start + offs_t, mask=ok, other=float("inf"))
            lmin = tl.minimum(lmin, lse)
    cell = h * n_seqs + seq
    tl.store(STATS + cell, tl.max(qmax, 0))
    tl.store(STATS + n_heads * n_seqs + cell, tl.max(kmax, 0))
    tl.store(STATS + 2 * n_heads * n_seqs + cell, tl.min(lmin, 0))


@triton.jit
def _log2_slope(SLOPES, h, HAS_ALIBI: tl.constexpr):
    if HAS_ALIBI:
        return tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
    else:
        return 0.0


@triton.jit
def _fwd_inner(
    acc,
    m_i,
    l_i,
    q,
    a_i,
    offs_m,
    k_ptrs,
    v_ptrs,
    stride_kt,
    stride_vt,
    lo,
    hi,
    seqlen,
    qk_scale,
    slope,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kt, mask=(offs_n < seqlen)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if HAS_ALIBI:
            # -slope*|i-j| as -|slope*i - slope*j|: float-only, no int->float per element
            s = s - tl.abs(a_i[:, None] - (offs_n.to(tl.float32) * slope)[None, :])
        if MASKED:
            keep = offs_n[None, :] < seqlen
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vt, mask=(offs_n < seqlen)[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vt)
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["stride_lh", "n_mblocks", "n_seqs"])
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    CU,
    SLOPES,
    STATS,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lh,
    n_heads,
    n_mblocks,
    n_seqs,
    qk_scale,
    skip_bits,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    ALIBI_REACH: tl.constexpr,
):
    h, base, seqlen, m0, seq = _program_tile(CU, n_heads, n_mblocks, BLOCK_M)
    if m0 >= seqlen:
        return
    # 64-bit math on the scalar base pointers only; tile offsets within a sequence stay 32-bit
    Q += base * stride_qt + h * stride_qh
    K += base * stride_kt + h * stride_kh
    V += base * stride_vt + h * stride_vh
    O += base * stride_ot + h * stride_oh
    LSE += h * stride_lh + base
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]
    slope = _log2_slope(SLOPES, h, HAS_ALIBI)
    a_i = offs_m.to(tl.float32) * slope
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
        full_hi = (tl.minimum(seqlen, m0 + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = seqlen
        full_hi = (seqlen // BLOCK_N) * BLOCK_N
    lo = 0
    if ALIBI_REACH:
        # keys farther than the reach score >= skip_bits below each row's own diagonal score,
        # a lower bound of its maximum: their terms vanish next to it in fp32, so they are skipped
        qf = q.to(tl.float32)
        kd = tl.load(K + offs_m[:, None] * stride_kt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        diag = tl.where(row_ok, tl.sum(qf * kd.to(tl.float32), 1) * qk_scale, float("inf"))
        qn = tl.max(tl.sqrt(tl.sum(qf * qf, 1)), 0)
        kn = tl.load(STATS + n_heads * n_seqs + h * n_seqs + seq)
        reach = _reach(qn * kn * qk_scale, tl.min(diag, 0), slope, seqlen, skip_bits)
        lo = (tl.maximum(m0 - reach, 0) // BLOCK_N) * BLOCK_N
        reach_hi = m0 + BLOCK_M + reach
        full_hi = tl.minimum(full_hi, ((reach_hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
        hi = tl.where(reach_hi > full_hi, hi, full_hi)
    # key blocks every query of the block may see: no masks; then the ragged/diagonal tail
    acc, m_i, l_i = _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
        a_i,
        offs_m,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        lo,
        full_hi,
        seqlen,
        qk_scale,
        slope,
        BLOCK_N,
        False,
        CAUSAL,
        HAS_ALIBI,
    )
    acc, m_i, l_i = _fwd_inner(
        acc,
        m_i,
        l_i,
        q,
        a_i,
        offs_m,
        k_ptrs,
        v_ptrs,
        stride_kt,
        stride_vt,
        full_hi,
        hi,
        seqlen,
        qk_scale,
        slope,
        BLOCK_N,
        True,
        CAUSAL,
        HAS_ALIBI,
    )
    o = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["stride_lh", "total"])
def _bwd_delta_kernel(
    O,
    DO,
    DELTA,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_lh,
    total,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    h = tl.program_id(1)
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_t < total)[:, None]
    o = tl.load(O + offs_t[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + offs_t[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * stride_lh + offs_t, delta, mask=offs_t < total)


@triton.jit(do_not_specialize=["stride_lh", "n_nblocks", "n_seqs"])
def _bwd_kv_kernel(
    Q,
    K,
    V,
    O,
    DO,
    DQ,
    DK,
    DV,
    LSE,
    DELTA,
    CU,
    SLOPES,
    STATS,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_dkt,
    stride_dkh,
    stride_dvt,
    stride_dvh,
    stride_lh,
    n_heads,
    n_nblocks,
    n_seqs,
    qk_scale,
    sm_scale,
    skip_bits,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DQ_MODE: tl.constexpr,
    ALIBI_REACH: tl.constexpr,
):
    # DQ_MODE 0: the sequence fits this key block; store dQ, delta from P and dP in place.
    #         1: fp32 atomics into DQ, delta precomputed.  2: no dQ here (separate kernel).
    h, base, seqlen, n0, seq = _program_tile(CU, n_heads, n_nblocks, BLOCK_N)
    if n0 >= seqlen:
        return
    Q += base * stride_qt + h * stride_qh
    K += base * stride_kt + h * stride_kh
    V += base * stride_vt + h * stride_vh
    O += base * stride_ot + h * stride_oh
    DO += base * stride_dot + h * stride_doh
    DQ += base * stride_dqt + h * stride_dqh
    DK += base * stride_dkt + h * stride_dkh
    DV += base * stride_dvt + h * stride_dvh
    LSE += h * stride_lh + base
    DELTA += h * stride_lh + base
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seqlen
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    slope = _log2_slope(SLOPES, h, HAS_ALIBI)
    # keys past the end must not feed dQ (their p can overflow when a row's lse is very low): with
    # ALiBi an infinite position gives p = exp2(-inf) = 0 at no per-element cost
    b_j = tl.where(col_ok, offs_n.to(tl.float32) * slope, float("inf"))
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_ptrs = Q + offs_m0[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = DO + offs_m0[:, None] * stride_dot + offs_d[None, :]
    if CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    hi = seqlen
    if ALIBI_REACH:  # queries beyond the reach give p < 2^-skip_bits with these keys (_reach)
        kf = k.to(tl.float32)
        kn = tl.max(tl.sqrt(tl.sum(kf * kf, 1)), 0)
        cell = h * n_seqs + seq
        qn = tl.load(STATS + cell)
        reach = _reach(qn * kn * qk_scale, tl.load(STATS + 2 * n_heads * n_seqs + cell), slope, seqlen, skip_bits)
        lo = tl.maximum(lo, (tl.maximum(n0 - reach, 0) // BLOCK_M) * BLOCK_M)
        hi = tl.minimum(hi, n0 + BLOCK_N + reach)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + offs_m0
        row_ok = offs_m < seqlen
        q = tl.load(q_ptrs + m0 * stride_qt, mask=row_ok[:, None], other=0.0)
        do = tl.load(do_ptrs + m0 * stride_dot, mask=row_ok[:, None], other=0.0)
        # rows past the end get lse = +inf, hence p = 0: they add nothing to dK, dV
        lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
        st = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M): keys along rows
        if HAS_ALIBI:
            st = st - tl.abs(b_j[:, None] - (offs_m.to(tl.float32) * slope)[None, :])
        pt = tl.exp2(st - lse[None, :])
        if CAUSAL:
            pt = tl.where(col_ok[:, None] & (offs_m[None, :] >= offs_n[:, None]), pt, 0.0)
        elif not HAS_ALIBI:
            pt = tl.where(col_ok[:, None], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, acc=dv)
        dpt = tl.dot(v, tl.trans(do))
        if DQ_MODE == 0:
            # every key of the row is in this block: delta = sum_j P dP exactly, without reading O
            # (rowsum(dO * O) would carry O's bf16 rounding into every dS)
            delta = tl.sum(pt * dpt, 0)
        else:
            delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, acc=dk)
        if DQ_MODE == 0:
            dq = tl.dot(tl.trans(dst), k) * sm_scale
            tl.store(
                DQ + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None]
            )
        elif DQ_MODE == 1:
            dq = tl.dot(tl.trans(dst), k) * sm_scale
            tl.atomic_add(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :], dq, mask=row_ok[:, None], sem="relaxed")
    dk = dk * sm_scale
    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit(do_not_specialize=["stride_lh", "n_mblocks", "n_seqs"])
def _bwd_dq_kernel(
    Q,
    K,
    V,
    O,
    DO,
    DQ,
    LSE,
    DELTA,
    CU,
    SLOPES,
    STATS,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_dot,
    stride_doh,
    stride_dqt,
    stride_dqh,
    stride_lh,
    n_heads,
    n_mblocks,
    n_seqs,
    qk_scale,
    sm_scale,
    skip_bits,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    ALIBI_REACH: tl.constexpr,
):
    # Also writes delta = rowsum(dO * O) for the dK/dV kernel that runs after it.
    h, base, seqlen, m0, seq = _program_tile(CU, n_heads, n_mblocks, BLOCK_M)
    if m0 >= seqlen:
        return
    Q += base * stride_qt + h * stride_qh
    K += base * stride_kt + h * stride_kh
    V += base * stride_vt + h * stride_vh
    O += base * stride_ot + h * stride_oh
    DO += base * stride_dot + h * stride_doh
    DQ += base * stride_dqt + h * stride_dqh
    LSE += h * stride_lh + base
    DELTA += h * stride_lh + base
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    o = tl.load(O + offs_m[:, None] * stride_ot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=float("inf"))
    slope = _log2_slope(SLOPES, h, HAS_ALIBI)
    a_i = offs_m.to(tl.float32) * slope
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_ptrs = K + offs_n0[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + offs_n0[:, None] * stride_vt + offs_d[None, :]
    if CAUSAL:
        hi = tl.minimum(seqlen, m0 + BLOCK_M)
    else:
        hi = seqlen
    lo = 0
    if ALIBI_REACH:  # keys beyond the reach give p < 2^-skip_bits for these queries (_reach)
        qf = q.to(tl.float32)
        qn = tl.max(tl.where(row_ok, tl.sqrt(tl.sum(qf * qf, 1)), 0.0), 0)
        kn = tl.load(STATS + n_heads * n_seqs + h * n_seqs + seq)
        reach = _reach(qn * kn * qk_scale, tl.min(tl.where(row_ok, lse, float("inf")), 0), slope, seqlen, skip_bits)
        lo = (tl.maximum(m0 - reach, 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(hi, m0 + BLOCK_M + reach)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        col_ok = offs_n < seqlen
        k = tl.load(k_ptrs + n0 * stride_kt, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs + n0 * stride_vt, mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if HAS_ALIBI:  # keys past the end sit at infinity: p = 0 (see the dK/dV kernel)
            b_j = tl.where(col_ok, offs_n.to(tl.float32) * slope, float("inf"))
            s = s - tl.abs(a_i[:, None] - b_j[None, :])
        p = tl.exp2(s - lse[:, None])
        if CAUSAL:
            p = tl.where(col_ok[None, :] & (offs_n[None, :] <= offs_m[:, None]), p, 0.0)
        elif not HAS_ALIBI:
            p = tl.where(col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq = tl.dot(ds, k, acc=dq)
    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Configurations and their choice
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BwdConfig:
    """dq_mode: "store" (needs block_n >= max_seqlen), "atomic" or "kernel" (dq_* blocks)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    dq_mode: str
    dq_block_m: int = 0
    dq_block_n: int = 0
    dq_num_warps: int = 4
    dq_num_stages: int = 2


def _bucket(max_seqlen: int) -> int:
    """Power-of-two bucket of max_seqlen: the tuning key, so batches of similar length share a choice."""
    return max(16, 1 << max(0, int(max_seqlen) - 1).bit_length())


def fwd_candidates(bucket: int, head_dim: int) -> list[FwdConfig]:
    """Forward configurations worth timing for one length bucket; the first is the default.

    Kept from sm_90 compiles without heavy spills (ptxas reports) and from timings on an H200
    (docs/kernels.md, "Tuning candidates"): up to 128 tokens 4-warp programs (two resident per SM),
    longer buckets 128-row blocks.
    """
    if head_dim == 128:
        return [FwdConfig(128, 32, 8, 2), FwdConfig(64, 64, 8, 2)]
    if bucket <= 64:
        return [FwdConfig(64, 32, 4, 2), FwdConfig(64, 64, 8, 2)]
    if bucket <= 128:
        return [
            FwdConfig(64, 32, 4, 3),
            FwdConfig(64, 32, 4, 4),
            FwdConfig(64, 64, 4, 3),
            FwdConfig(64, 32, 4, 2),
            FwdConfig(128, 32, 4, 2),
            FwdConfig(128, 64, 8, 2),
        ]
    if bucket < 1024:
        return [FwdConfig(128, 64, 8, 3), FwdConfig(128, 32, 4, 3), FwdConfig(128, 64, 8, 4)]
    # long sequences: most key blocks run unmasked, larger key tiles amortise the softmax bookkeeping
    return [
        FwdConfig(128, 64, 8, 3),
        FwdConfig(128, 128, 8, 3),
        FwdConfig(128, 64, 4, 3),
        FwdConfig(128, 32, 4, 3),
        FwdConfig(128, 64, 8, 4),
    ]


def bwd_candidates(bucket: int, head_dim: int) -> list[BwdConfig]:
    """Backward configurations worth timing for one length bucket; the first is the default.

    Up to 128 tokens a sequence fits one key block and dQ is stored directly ("store"). Beyond,
    the separate dQ kernel comes first and fp32 atomics are the alternative (timings on an H200:
    docs/kernels.md, "Tuning candidates").
    """
    if head_dim == 128:
        if bucket <= 64:
            return [BwdConfig(16, 64, 8, 2, "store"), BwdConfig(16, 64, 8, 2, "atomic")]
        return [BwdConfig(16, 64, 8, 2, "atomic"), BwdConfig(32, 64, 8, 2, "kernel", 64, 32, 8, 2)]
    if bucket <= 64:
        return [BwdConfig(16, 64, 8, 2, "store"), BwdConfig(32, 64, 8, 2, "store")]
    if bucket <= 128:
        return [
            BwdConfig(32, 128, 4, 3, "store"),
            BwdConfig(32, 128, 4, 4, "store"),
            BwdConfig(16, 128, 4, 3, "store"),
            BwdConfig(64, 128, 8, 3, "store"),
            BwdConfig(32, 128, 4, 2, "store"),
            BwdConfig(32, 64, 4, 3, "kernel", 64, 32, 4, 3),
        ]
    if bucket < 1024:
        return [
            BwdConfig(64, 128, 8, 2, "kernel", 128, 64, 8, 2),
            BwdConfig(64, 128, 8, 3, "kernel", 128, 32, 8, 3),
            BwdConfig(64, 128, 8, 2, "atomic"),
        ]
    # long sequences: fp32 atomics contend as every query row gets one add per key block, so the
    # separate dQ kernel; smaller query tiles with 4 warps keep more programs resident per SM
    return [
        BwdConfig(64, 128, 8, 2, "kernel", 128, 64, 8, 2),
        BwdConfig(32, 128, 4, 3, "kernel", 128, 32, 4, 3),
        BwdConfig(64, 128, 8, 3, "kernel", 128, 32, 8, 3),
        BwdConfig(64, 64, 4, 3, "kernel", 64, 64, 4, 3),
        BwdConfig(64, 128, 8, 2, "atomic"),
    ]


def wide_fwd_candidates(bucket: int, head_dim: int) -> list[FwdConfig]:
    """A grid of forward configurations for sweeps (MOSAICBERT_FLASH_CANDIDATES=wide): block shapes,
    warps and pipeline stages; shapes whose tiles would not fit shared memory at head_dim 128 left out."""
    return [
        FwdConfig(m, n, warps, stages)
        for m in (64, 128)
        for n in (32, 64, 128)
        for warps in (4, 8)
        for stages in (2, 3, 4)
        if head_dim < 128 or m * n <= 128 * 64
    ]


def wide_bwd_candidates(bucket: int, head_dim: int) -> list[BwdConfig]:
    """A grid of backward configurations for sweeps: dK/dV tiles x warps x stages, each with the
    separate dQ kernel in two shapes, fp32 atomics, and "store" where a sequence fits a key block."""
    out = []
    for m in (16, 32, 64):
        for n in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    if head_dim == 128 and m * n > 64 * 64:
                        continue
                    out += [
                        BwdConfig(m, n, warps, stages, "kernel", 128, 32, 4, 3),
                        BwdConfig(m, n, warps, stages, "kernel", 128, 64, 8, 2),
                        BwdConfig(m, n, warps, stages, "atomic"),
                    ]
                    if n >= bucket:
                        out.append(BwdConfig(m, n, warps, stages, "store"))
    return out


def _with_wide(default: list, wide: list) -> list:
    """The default list, then (with MOSAICBERT_FLASH_CANDIDATES=wide) the grid, without repeats."""
    if os.environ.get("MOSAICBERT_FLASH_CANDIDATES", "") != "wide":
        return default
    return default + [c for c in wide if c not in default]


_chosen: dict[tuple, object] = {}
_timings: dict[tuple, list[tuple[object, float]]] = {}
_forced: dict[str, object] = {}


def chosen_configs() -> dict[tuple, object]:
    """The configuration picked for each tuning key so far (for benchmarks and logs)."""
    return dict(_chosen)


def tuning_timings() -> dict[tuple, list[tuple[object, float]]]:
    """Median milliseconds of every candidate timed so far, per tuning key."""
    return {k: list(v) for k, v in _timings.items()}


def force_config(fwd: FwdConfig | None = None, bwd: BwdConfig | None = None) -> None:
    """Use these configurations for every call (tests); None restores tuning."""
    _forced.clear()
    if fwd is not None:
        _forced["fwd"] = fwd
    if bwd is not None:
        _forced["bwd"] = bwd


def _tuning_enabled() -> bool:
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return not interpret and os.environ.get("MOSAICBERT_FLASH_TUNE", "1") != "0"


def _pick(kind: str, key: tuple, candidates: Callable[[], list], run: Callable[[object], None]) -> object:
    """The fastest of candidates() for `key`, timed once with `run(config)` and then cached."""
    if kind in _forced:
        return _forced[kind]
    full_key = (kind,) + key
    if full_key in _chosen:
        return _chosen[full_key]
    candidates = candidates()
    if not _tuning_enabled() or len(candidates) == 1:
        _chosen[full_key] = candidates[0]
        return candidates[0]
    from triton.testing import do_bench

    best, best_ms = None, math.inf
    for cfg in candidates:
        try:
            run(cfg)  # compile outside the timing
            ms = do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=25, return_mode="median")
        except Exception as exc:  # e.g. out of shared memory for this block shape
            if "OutOfResources" not in type(exc).__name__ and "out of resource" not in str(exc).lower():
                raise
            continue
        _timings.setdefault(full_key, []).append((cfg, ms))
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no {kind} configuration of the flash kernel fits this GPU for {key}")
    _chosen[full_key] = best
    return best


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    assert q.dim() == 3 and q.shape == k.shape == v.shape, (
        f"q, k, v must be (T, H, D) alike: {tuple(q.shape)} {tuple(k.shape)} {tuple(v.shape)}"
    )
    assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype, (
        f"bf16/fp16 only, all alike: {q.dtype} {k.dtype} {v.dtype}"
    )
    assert q.shape[-1] in (32, 64, 128), f"head_dim must be 32, 64 or 128, got {q.shape[-1]}"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "head_dim must be contiguous"
    assert q.device == k.device == v.device == cu_seqlens.device, "all tensors on one device"
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 1, (
        "cu_seqlens must be int32 (batch + 1,)"
    )


REACH_MIN_SEQLEN = 512
"""The ALiBi reach (MOSAICBERT_FLASH_ALIBI_REACH=1) applies from this max_seqlen on: below, few
key blocks are far enough to skip, and the statistics pass would cost more than it saves."""
ALIBI_SKIP_BITS = 40.0
"""A skipped score is at least this many powers of two below its row's maximum (logsumexp in the
backward): each skipped term is below 2^-40 of the largest one, far under fp32 rounding."""


def alibi_reach(max_seqlen: int, has_alibi: bool) -> bool:
    """Whether the kernels skip the key blocks beyond ALiBi's reach (see the module docstring)."""
    return (
        has_alibi
        and max_seqlen >= REACH_MIN_SEQLEN
        and os.environ.get("MOSAICBERT_FLASH_ALIBI_REACH", "0") not in ("", "0")
    )


def _seq_stats(q, k, cu_seqlens, lse: torch.Tensor | None = None) -> torch.Tensor:
    """(3, heads, sequences) fp32: per head and sequence the largest |q|, the largest |k| and (with
    `lse`) the smallest logsumexp; for the ALiBi reach. Reads q and k once."""
    total, n_heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    stats = torch.empty((3, n_heads, batch), dtype=torch.float32, device=q.device)
    _seq_stats_kernel[(n_heads * batch,)](
        q,
        k,
        lse if lse is not None else stats,
        stats,
        cu_seqlens,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        lse.stride(0) if lse is not None else 0,
        n_heads,
        batch,
        HEAD_DIM=head_dim,
        BLOCK_T=64,
        WITH_LSE=lse is not None,
        num_warps=4,
    )
    return stats


def _slopes_arg(alibi_slopes: torch.Tensor | None, n_heads: int, ref: torch.Tensor) -> torch.Tensor:
    if alibi_slopes is None:
        return ref  # never read: HAS_ALIBI is False
    assert alibi_slopes.shape == (n_heads,), f"alibi_slopes must be (heads,), got {tuple(alibi_slopes.shape)}"
    return alibi_slopes.to(device=ref.device, dtype=torch.float32).contiguous()


def _launch_fwd(
    cfg: FwdConfig, q, k, v, o, lse, cu_seqlens, slopes, max_seqlen, qk_scale, causal, has_alibi, stats
) -> None:
    total, n_heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    n_mblocks = triton.cdiv(max_seqlen, cfg.block_m)
    grid = (n_heads * batch * n_mblocks,)
    _fwd_kernel[grid](
        q,
        k,
        v,
        o,
        lse,
        cu_seqlens,
        slopes,
        stats if stats is not None else lse,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        o.stride(0),
        o.stride(1),
        lse.stride(0),
        n_heads,
        n_mblocks,
        batch,
        qk_scale,
        ALIBI_SKIP_BITS,
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        CAUSAL=causal,
        HAS_ALIBI=has_alibi,
        ALIBI_REACH=stats is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def flash_attn_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    causal: bool,
    alibi_slopes: torch.Tensor | None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: out (T, H, D) and the base-2 logsumexp (H, T) fp32, allocated unless given."""
    _check_qkv(q, k, v, cu_seqlens)
    total, n_heads, head_dim = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((n_heads, total), dtype=torch.float32, device=q.device) if lse is None else lse
    assert o.shape == q.shape and o.dtype == q.dtype and o.stride(-1) == 1, f"out: {o.shape} {o.dtype}"
    assert lse.shape == (n_heads, total) and lse.dtype == torch.float32 and lse.stride(1) == 1, "lse: (H, T) fp32"
    if total == 0 or max_seqlen <= 0 or cu_seqlens.numel() < 2:
        return o, lse
    slopes = _slopes_arg(alibi_slopes, n_heads, lse)
    qk_scale = softmax_scale * LOG2E
    reach = alibi_reach(max_seqlen, alibi_slopes is not None)
    stats = _seq_stats(q, k, cu_seqlens) if reach else None
    args = (q, k, v, o, lse, cu_seqlens, slopes, max_seqlen, qk_scale, causal, alibi_slopes is not None, stats)
    key = (_bucket(max_seqlen), head_dim, q.dtype, causal, alibi_slopes is not None, reach)
    cfg = _pick(
        "fwd",
        key,
        lambda: _with_wide(fwd_candidates(key[0], head_dim), wide_fwd_candidates(key[0], head_dim)),
        lambda c: _launch_fwd(c, *args),
    )
    _launch_fwd(cfg, *args)
    return o, lse


def _launch_bwd(
    cfg: BwdConfig, do, q, k, v, o, lse, cu_seqlens, slopes, max_seqlen, sm_scale, causal, has_alibi, dq, dk, dv, stats
) -> None:
    total, n_heads, head_dim = q.shape
    reach = stats is not None and cfg.dq_mode != "store"
    stats = stats if reach else lse  # never read without the reach
    batch = cu_seqlens.numel() - 1
    qk_scale = sm_scale * LOG2E
    if cfg.dq_mode == "store":
        assert cfg.block_n >= max_seqlen, "dq_mode 'store' needs each sequence inside one key block"
        delta, dq_out, mode = lse, dq, 0  # delta is computed in the kernel; the argument is unused
    elif cfg.dq_mode == "atomic":
        delta = torch.empty_like(lse)
        block_t = 64
        _bwd_delta_kernel[(triton.cdiv(total, block_t), n_heads)](
            o,
            do,
            delta,
            o.stride(0),
            o.stride(1),
            do.stride(0),
            do.stride(1),
            delta.stride(0),
            total,
            HEAD_DIM=head_dim,
            BLOCK_T=block_t,
            num_warps=4,
        )
        dq_out, mode = torch.zeros(q.shape, dtype=torch.float32, device=q.device), 1
    elif cfg.dq_mode == "kernel":
        delta = torch.empty_like(lse)
        n_mblocks = triton.cdiv(max_seqlen, cfg.dq_block_m)
        _bwd_dq_kernel[(n_heads * batch * n_mblocks,)](
            q,
            k,
            v,
            o,
            do,
            dq,
            lse,
            delta,
            cu_seqlens,
            slopes,
            stats,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            o.stride(0),
            o.stride(1),
            do.stride(0),
            do.stride(1),
            dq.stride(0),
            dq.stride(1),
            lse.stride(0),
            n_heads,
            n_mblocks,
            batch,
            qk_scale,
            sm_scale,
            ALIBI_SKIP_BITS,
            HEAD_DIM=head_dim,
            BLOCK_M=cfg.dq_block_m,
            BLOCK_N=cfg.dq_block_n,
            CAUSAL=causal,
            HAS_ALIBI=has_alibi,
            ALIBI_REACH=reach,
            num_warps=cfg.dq_num_warps,
            num_stages=cfg.dq_num_stages,
        )
        dq_out, mode = dq, 2
    else:
        raise ValueError(f"unknown dq_mode {cfg.dq_mode!r}")
    n_nblocks = triton.cdiv(max_seqlen, cfg.block_n)
    _bwd_kv_kernel[(n_heads * batch * n_nblocks,)](
        q,
        k,
        v,
        o,
        do,
        dq_out,
        dk,
        dv,
        lse,
        delta,
        cu_seqlens,
        slopes,
        stats,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        o.stride(0),
        o.stride(1),
        do.stride(0),
        do.stride(1),
        dq_out.stride(0),
        dq_out.stride(1),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        lse.stride(0),
        n_heads,
        n_nblocks,
        batch,
        qk_scale,
        sm_scale,
        ALIBI_SKIP_BITS,
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        CAUSAL=causal,
        HAS_ALIBI=has_alibi,
        DQ_MODE=mode,
        ALIBI_REACH=reach,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if mode == 1:
        dq.copy_(dq_out)


def flash_attn_varlen_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    causal: bool,
    alibi_slopes: torch.Tensor | None,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Backward launcher: writes dq, dk, dv (any (T, H, D) views with a contiguous last dimension)."""
    _check_qkv(q, k, v, cu_seqlens)
    total, n_heads, head_dim = q.shape
    for name, t in (("o", o), ("do", do), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert t.shape == q.shape and t.dtype == q.dtype and t.stride(-1) == 1, f"{name}: {t.shape} {t.dtype}"
    assert lse.shape == (n_heads, total) and lse.dtype == torch.float32 and lse.stride(1) == 1
    if total == 0:
        return
    if max_seqlen <= 0 or cu_seqlens.numel() < 2:
        for t in (dq, dk, dv):
            t.zero_()
        return
    slopes = _slopes_arg(alibi_slopes, n_heads, lse)
    reach = alibi_reach(max_seqlen, alibi_slopes is not None)
    stats = _seq_stats(q, k, cu_seqlens, lse) if reach else None
    args = (
        do,
        q,
        k,
        v,
        o,
        lse,
        cu_seqlens,
        slopes,
        max_seqlen,
        softmax_scale,
        causal,
        alibi_slopes is not None,
        dq,
        dk,
        dv,
        stats,
    )
    key = (_bucket(max_seqlen), head_dim, q.dtype, causal, alibi_slopes is not None, reach)
    cfg = _pick(
        "bwd",
        key,
        lambda: [
            c
            for c in _with_wide(bwd_candidates(key[0], head_dim), wide_bwd_candidates(key[0], head_dim))
            if c.dq_mode != "store" or c.block_n >= max_seqlen
        ],
        lambda c: _launch_bwd(c, *args),
    )
    _launch_bwd(cfg, *args)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


def _same_sequences(cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int) -> None:
    if max_q != max_k:
        raise NotImplementedError("self-attention only: max_seqlen_q must equal max_seqlen_k")
    if cu_q is cu_k or (cu_q.data_ptr() == cu_k.data_ptr() and cu_q.shape == cu_k.shape):
        return
    if not torch.equal(cu_q, cu_k):  # a device sync, only when two different tensors are passed
        raise NotImplementedError("self-attention only: cu_seqlens_q must equal cu_seqlens_k")


def _packed_base(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """The (T, 3, H, D) tensor that q, k, v are exactly the three slices of (the model's
    qkv.unbind(1) of its QKV projection), or None. Differentiating through it directly hands
    autograd one dqkv instead of three gradients that UnbindBackward would stack (a full copy)."""
    base = q._base
    if base is None or k._base is not base or v._base is not base or not base.is_contiguous():
        return None
    total, n_heads, head_dim = q.shape
    hd, size = n_heads * head_dim, q.element_size()
    if base.numel() != 3 * total * hd or base.data_ptr() != q.data_ptr():
        return None
    strides = (3 * hd, head_dim, 1)
    if (
        k.data_ptr() != q.data_ptr() + hd * size
        or v.data_ptr() != q.data_ptr() + 2 * hd * size
        or not q.stride() == k.stride() == v.stride() == strides
    ):
        return None
    return base.view(total, 3, n_heads, head_dim)


def _grad_ready(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes):
        q, k, v = (_grad_ready(t) for t in (q, k, v))
        o, lse = flash_attn_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, alibi_slopes)
        ctx.max_seqlen, ctx.softmax_scale, ctx.causal = max_seqlen, softmax_scale, causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens, alibi_slopes = ctx.saved_tensors
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
        flash_attn_varlen_bwd(
            _grad_ready(do),
            q,
            k,
            v,
            o,
            lse,
            cu_seqlens,
            ctx.max_seqlen,
            ctx.softmax_scale,
            ctx.causal,
            alibi_slopes,
            dq,
            dk,
            dv,
        )
        return dq, dk, dv, None, None, None, None, None


class FlashAttnVarlenQKVPackedFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes):
        qkv = _grad_ready(qkv)
        q, k, v = qkv.unbind(1)
        o, lse = flash_attn_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, alibi_slopes)
        ctx.save_for_backward(qkv, o, lse, cu_seqlens, alibi_slopes)
        ctx.max_seqlen, ctx.softmax_scale, ctx.causal = max_seqlen, softmax_scale, causal
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse, cu_seqlens, alibi_slopes = ctx.saved_tensors
        dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
        q, k, v = qkv.unbind(1)
        dq, dk, dv = dqkv.unbind(1)  # the kernels write straight into the packed gradient
        flash_attn_varlen_bwd(
            _grad_ready(do),
            q,
            k,
            v,
            o,
            lse,
            cu_seqlens,
            ctx.max_seqlen,
            ctx.softmax_scale,
            ctx.causal,
            alibi_slopes,
            dq,
            dk,
            dv,
        )
        return dqkv, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Public API (flash-attn's varlen signatures plus alibi_slopes)
# ----------------------------------------------------------------------------------------------


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
) -> torch.Tensor:
    """Attention over each sequence of a packed batch; q, k, v (T, H, D) -> (T, H, D)."""
    if dropout_p != 0.0:
        raise ValueError("the Triton flash kernel has no attention dropout: dropout_p must be 0")
    _same_sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    qkv = _packed_base(q, k, v) if torch.is_grad_enabled() and q.requires_grad else None
    if qkv is not None:
        return FlashAttnVarlenQKVPackedFunc.apply(
            qkv, cu_seqlens_q, int(max_seqlen_q), float(scale), bool(causal), alibi_slopes
        )
    return FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, int(max_seqlen_q), float(scale), bool(causal), alibi_slopes)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """As flash_attn_varlen_func with qkv (T, 3, H, D); the gradient lands in one (T, 3, H, D) tensor."""
    if dropout_p != 0.0:
        raise ValueError("the Triton flash kernel has no attention dropout: dropout_p must be 0")
    assert qkv.dim() == 4 and qkv.shape[1] == 3, f"qkv must be (T, 3, H, D), got {tuple(qkv.shape)}"
    scale = softmax_scale if softmax_scale is not None else qkv.shape[-1] ** -0.5
    return FlashAttnVarlenQKVPackedFunc.apply(
        qkv, cu_seqlens, int(max_seqlen), float(scale), bool(causal), alibi_slopes
    )
