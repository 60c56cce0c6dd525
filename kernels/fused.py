"""Fused elementwise kernels in Triton: GeGLU and dropout + residual add + LayerNorm.

Supports
    geglu(h, approximate, p): h (..., 2 * ff) -> Dropout_p(GELU(h[..., :ff]) * h[..., ff:]), GELU
    exact ("none") or tanh-approximated ("tanh"); any float dtype; one kernel forward, one backward.
    dropout_add_layer_norm(x, residual, weight, bias, eps, p, low_precision, linear_bias, residual_sink):
    LayerNorm(Dropout_p(x + linear_bias) + residual) over the last dimension (up to 16384
    features); linear_bias is the bias of the matmul that produced x, added here so that its
    gradient (a column sum) comes out of the backward kernel instead of a separate reduction;
    residual_sink may take the residual's gradient for the layer's first linear to add into; the
    dtypes of mosaicbert_ds.ops: under autocast the output is the autocast dtype when
    low_precision, else fp32 (what autocast's layer_norm returns); without autocast the
    promoted dtype of x and residual. Statistics always in fp32.
Limits
    Dropout draws from Triton's Philox (tl.randint4x) with a seed that torch's generator draws on
    the device (graph-safe, no host sync): masks are reproducible under torch.manual_seed but
    differ from torch.nn.functional.dropout's.
    Each element gets its own 16-bit uniform number (each Philox 32-bit output split into two
    halves) and is kept when that number is >= t = round(p * 65536), t computed on the host: the
    effective drop probability is t / 65536, not p (off by at most 2**-17), and kept values are
    scaled by 65536 / (65536 - t) so that the expected value is preserved exactly for it. A p so
    small that t rounds to 0 (p <= 2**-17) means no dropout at all; p = 1 drops everything.
    The backward regenerates the mask from the seed instead of storing it. Philox counters are 32
    bits, one per eight elements: past 2**35 elements per call masks would repeat.
Tested
    Triton's interpreter on CPU (triton 3.6, 3.8); compiled on one NVIDIA H200 (triton 3.6), also
    inside a whole MosaicBERT-Base training step against the PyTorch ops (tests/integration/test_gpu.py), and
    replayed in CUDA graphs with fresh masks per replay (tests/integration/test_graphs.py).
    The 16-bit dropout passed the GPU kernel and whole-step tests on the H200 as well
    (raw/gpu-tests_c30cac8_dropout16.txt in benchmarks/results/h200_2026-11-29).
    Any Tiling gives the same masks and results (tests/kernels/test_kernels.py, interpreter and H200).
    H200, batch 256 x 128 (~29k real tokens), per step of 12 layers (profile_step --graphs): GeGLU
    with dropout 2.4 ms forward, 3.2 ms backward; the LayerNorm kernels 1.3 / 1.7 ms (24 calls
    each). Untiled (one row per program) they took 2.5 / 3.2 and 1.3 / 2.0 ms; with one Philox
    counter per four elements (tl.rand4x) 3.0 / 3.6 and 1.5 / 2.1 ms; with one per element
    4.8 / 5.4 ms for GeGLU.
Known risks
    Rows longer than 16384 features are rejected (a row's block is held in registers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _gelu_and_grad(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # tanh(u), saturating cleanly at +-1
        g = 0.5 * x * (1.0 + t)
        dg = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * x * x)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        g = x * cdf
        dg = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    return g, dg


@triton.jit
def _dropout(x, threshold, scale, SEED, block_ids, BLOCK: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    # Dropout on a (ROWS, BLOCK) tile, row i being block block_ids[i] of BLOCK elements. Philox
    # yields four uint32 per counter (randint4x) and each is split into two 16-bit numbers: one
    # counter per eight elements, an eighth of tl.rand's one per element (Philox made the GeGLU
    # kernels compute-bound). Element e of block b takes counter b * (BLOCK // 8) + e // 8, word
    # (e % 8) // 2 of it, the low half for even e and the high half for odd e, so no two elements
    # share a number and blocks share no counter: the mask depends on BLOCK, not on how many
    # rows a program takes. An element is kept when its number is >= threshold
    # (t = round(p * 65536), from the host); scale is 65536 / (65536 - t), exact for the effective
    # drop probability t / 65536. The same (seed, block) gives the same mask in the backward. The
    # seed is read from device memory, so a CUDA graph replays with fresh seeds.
    if HAS_DROPOUT:
        tl.static_assert(BLOCK % 8 == 0, "dropout needs a block of a multiple of 8 elements")
        ROWS: tl.constexpr = x.shape[0]
        offs = (block_ids[:, None] * (BLOCK // 8) + tl.arange(0, BLOCK // 8)[None, :]).to(tl.int32)
        r0, r1, r2, r3 = tl.randint4x(tl.load(SEED), offs)  # uint32 each, (ROWS, BLOCK // 8)
        # join adds a minor dimension: [., c, j, i] = (r0, r2)[j] if i == 0 else (r1, r3)[j], so
        # each row's flattened order is r0, r1, r2, r3 (word 2j + i)
        w = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [ROWS, BLOCK // 2])
        r = tl.reshape(tl.join(w & 0xFFFF, w >> 16), [ROWS, BLOCK])
        x = tl.where(r >= threshold, x * scale, 0.0)
    return x


@triton.jit
def _geglu_fwd_kernel(
    H,
    OUT,
    n_rows,
    ff,
    stride_h,
    stride_o,
    threshold,
    scale,
    SEED,
    APPROX_TANH: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows[:, None] < n_rows) & (cols[None, :] < ff)
    h = H + rows[:, None] * stride_h + cols[None, :]
    gate = tl.load(h, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h + ff, mask=ok, other=0.0).to(tl.float32)
    g, _ = _gelu_and_grad(gate, APPROX_TANH)
    out = _dropout(g * up, threshold, scale, SEED, rows * tl.num_programs(1) + tl.program_id(1), BLOCK, HAS_DROPOUT)
    tl.store(OUT + rows[:, None] * stride_o + cols[None, :], out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _geglu_bwd_kernel(
    H,
    DOUT,
    DH,
    n_rows,
    ff,
    stride_h,
    stride_do,
    stride_dh,
    threshold,
    scale,
    SEED,
    APPROX_TANH: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows[:, None] < n_rows) & (cols[None, :] < ff)
    h = H + rows[:, None] * stride_h + cols[None, :]
    gate = tl.load(h, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h + ff, mask=ok, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + rows[:, None] * stride_do + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    dout = _dropout(dout, threshold, scale, SEED, rows * tl.num_programs(1) + tl.program_id(1), BLOCK, HAS_DROPOUT)
    g, dg = _gelu_and_grad(gate, APPROX_TANH)
    dh = DH + rows[:, None] * stride_dh + cols[None, :]
    tl.store(dh, (dout * up * dg).to(DH.dtype.element_ty), mask=ok)
    tl.store(dh + ff, (dout * g).to(DH.dtype.element_ty), mask=ok)


@triton.jit
def _dal_fwd_kernel(
    X,
    LB,
    R,
    W,
    B,
    OUT,
    Z,
    MEAN,
    RSTD,
    n_rows,
    n_cols,
    stride_x,
    stride_r,
    stride_o,
    stride_z,
    eps,
    threshold,
    scale,
    SEED,
    HAS_LINEAR_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_LINEAR_BIAS:
        x += tl.load(LB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x = _dropout(x, threshold, scale, SEED, rows, BLOCK, HAS_DROPOUT)
    z = x + tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(z, 1) / n_cols
    zc = tl.where(ok, z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, 1) / n_cols + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = zc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(OUT + rows[:, None] * stride_o + cols[None, :], out.to(OUT.dtype.element_ty), mask=ok)
    tl.store(Z + rows[:, None] * stride_z + cols[None, :], z.to(Z.dtype.element_ty), mask=ok)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _dal_bwd_kernel(
    DOUT,
    Z,
    W,
    MEAN,
    RSTD,
    DX,
    DR,
    PART,
    n_rows,
    n_cols,
    rows_per_prog,
    stride_do,
    stride_z,
    stride_dx,
    stride_dr,
    stride_part,
    threshold,
    scale,
    SEED,
    HAS_LINEAR_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    # each program takes a run of rows, ROWS at a time, and leaves its partial dW, dB (and
    # d linear_bias, the column sum of dX) in PART[k, program]; the host sums PART over programs
    # in one reduction
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    db = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    dlb = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    for first in range(row_start, row_end, ROWS):
        rows = (first + tl.arange(0, ROWS)).to(tl.int64)
        row_ok = rows < row_end
        ok = row_ok[:, None] & col_ok[None, :]
        dout = tl.load(DOUT + rows[:, None] * stride_do + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (z - mean[:, None]) * rstd[:, None], 0.0)
        g = dout * w
        dz = (g - (tl.sum(g, 1) / n_cols)[:, None] - xhat * (tl.sum(g * xhat, 1) / n_cols)[:, None]) * rstd[:, None]
        tl.store(DR + rows[:, None] * stride_dr + cols[None, :], dz.to(DR.dtype.element_ty), mask=ok)
        dx = _dropout(dz, threshold, scale, SEED, rows, BLOCK, HAS_DROPOUT)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        dw += dout * xhat
        db += dout
        if HAS_LINEAR_BIAS:
            dlb += dx
    tl.store(PART + pid * n_cols + cols, tl.sum(dw, 0), mask=col_ok)
    tl.store(PART + stride_part + pid * n_cols + cols, tl.sum(db, 0), mask=col_ok)
    if HAS_LINEAR_BIAS:
        tl.store(PART + 2 * stride_part + pid * n_cols + cols, tl.sum(dlb, 0), mask=col_ok)


# ----------------------------------------------------------------------------------------------
# Host launchers and autograd
# ----------------------------------------------------------------------------------------------

_GEGLU_BLOCK = 1024  # part of the dropout mask's definition (counters are laid out per block)


@dataclass(frozen=True)
class Tiling:
    """Rows per program (or per loop iteration of the LayerNorm backward) and warps of the fused
    kernels. Any values give the same results, dropout masks included; the defaults were the
    fastest on an H200 at MosaicBERT-Base shapes (python -m benchmarks.fused_tiling)."""

    geglu_rows: int = 4
    geglu_warps: int = 4
    geglu_bwd_rows: int = 1
    geglu_bwd_warps: int = 4
    ln_rows: int = 2  # alone as fast as 1 row (2 warps); in the step 1.3 instead of 1.5 ms
    ln_elems_per_warp: int = 512  # a LayerNorm tile of rows x block elements gets this many per warp
    ln_bwd_rows: int = 1
    ln_bwd_elems_per_warp: int = 512
    ln_bwd_programs: int = 2048  # each takes a run of rows and leaves one row of column partials


TILING = Tiling()


def _ln_warps(rows: int, block: int, elems_per_warp: int) -> int:
    return min(16, max(1, rows * block // elems_per_warp))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n) with a contiguous last dimension, copying only when needed."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check_approx(approximate: str) -> bool:
    assert approximate in ("none", "tanh"), f"approximate must be 'none' or 'tanh', got {approximate!r}"
    return approximate == "tanh"


_DROPOUT_LEVELS = 65536  # dropout compares 16-bit uniform numbers with a threshold


def _dropout_threshold(p: float) -> int:
    """t = round(p * 65536): an element is dropped when its 16-bit number is < t, so the effective
    drop probability is t / 65536."""
    assert 0.0 <= p <= 1.0, f"dropout probability must be in [0, 1], got {p}"
    return round(p * _DROPOUT_LEVELS)


def _dropout_args(p: float, like: torch.Tensor) -> tuple[bool, int, float, torch.Tensor]:
    """(has_dropout, threshold, scale, seed): threshold t = round(p * 65536) and scale
    65536 / (65536 - t), which keeps the expected value exactly for the effective drop
    probability t / 65536 (t = 65536, p = 1: everything dropped, scale unused). The seed is a
    one-element tensor drawn by torch's generator on `like`'s device. Drawn on the device, it
    needs no host sync and stays random under CUDA-graph replay (torch's CUDA generator advances
    its offset on every replay); without dropout (p = 0, or p so small that t rounds to 0) the
    seed argument is never read and `like` (a tensor the caller saves anyway) stands in for it."""
    t = _dropout_threshold(p)
    if t == 0:
        return False, 0, 1.0, like
    scale = 0.0 if t >= _DROPOUT_LEVELS else _DROPOUT_LEVELS / (_DROPOUT_LEVELS - t)
    return True, t, scale, torch.randint(0, 2**31 - 1, (1,), device=like.device)


def _ln_block(n: int) -> int:
    """A row's power-of-two block of at least 8 elements (dropout takes 8 per counter)."""
    return max(8, triton.next_power_of_2(n))


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, approximate: str, p: float) -> torch.Tensor:
        tanh = _check_approx(approximate)
        assert h.shape[-1] % 2 == 0, f"the last dimension must be even (gate; up), got {h.shape[-1]}"
        h2 = _rows(h)
        has_dropout, threshold, scale, seed = _dropout_args(p, h2)
        rows, ff = h2.shape[0], h2.shape[1] // 2
        out = torch.empty((rows, ff), dtype=h.dtype, device=h.device)
        if rows and ff:
            t = TILING
            _geglu_fwd_kernel[(triton.cdiv(rows, t.geglu_rows), triton.cdiv(ff, _GEGLU_BLOCK))](
                h2,
                out,
                rows,
                ff,
                h2.stride(0),
                out.stride(0),
                threshold,
                scale,
                seed,
                APPROX_TANH=tanh,
                HAS_DROPOUT=has_dropout,
                BLOCK=_GEGLU_BLOCK,
                ROWS=t.geglu_rows,
                num_warps=t.geglu_warps,
            )
        ctx.save_for_backward(h2, seed)
        ctx.tanh, ctx.shape, ctx.dropout = tanh, h.shape, (threshold, scale, has_dropout)
        return out.view(*h.shape[:-1], ff)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        h2, seed = ctx.saved_tensors
        rows, ff = h2.shape[0], h2.shape[1] // 2
        threshold, scale, has_dropout = ctx.dropout
        d2 = _rows(dout)
        dh = torch.empty_like(h2)
        if rows and ff:
            t = TILING
            _geglu_bwd_kernel[(triton.cdiv(rows, t.geglu_bwd_rows), triton.cdiv(ff, _GEGLU_BLOCK))](
                h2,
                d2,
                dh,
                rows,
                ff,
                h2.stride(0),
                d2.stride(0),
                dh.stride(0),
                threshold,
                scale,
                seed,
                APPROX_TANH=ctx.tanh,
                HAS_DROPOUT=has_dropout,
                BLOCK=_GEGLU_BLOCK,
                ROWS=t.geglu_bwd_rows,
                num_warps=t.geglu_bwd_warps,
            )
        return dh.view(ctx.shape), None, None


def geglu(h: torch.Tensor, approximate: str = "none", p: float = 0.0) -> torch.Tensor:
    """Dropout_p(GELU(h[..., :ff]) * h[..., ff:]) for h (..., 2 * ff), differentiable."""
    return GeGLUFunction.apply(h, approximate, float(p))


class DropoutAddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        linear_bias: torch.Tensor | None,
        eps: float,
        p: float,
        out_dtype: torch.dtype,
        residual_sink: object | None,
    ) -> torch.Tensor:
        assert x.shape == residual.shape, f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ"
        n = x.shape[-1]
        assert weight.shape == (n,) and bias.shape == (n,), "weight and bias must be (hidden,)"
        assert linear_bias is None or linear_bias.shape == (n,), "linear_bias must be (hidden,)"
        block = _ln_block(n)
        assert block <= 16384, f"hidden size {n} is above this kernel's 16384"
        x2, r2 = _rows(x), _rows(residual)
        rows = x2.shape[0]
        out = torch.empty((rows, n), dtype=out_dtype, device=x.device)
        z = torch.empty((rows, n), dtype=out_dtype, device=x.device)  # pre-norm sum, for backward
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        has_dropout, threshold, scale, seed = _dropout_args(p, rstd)  # rstd: saved anyway, stands in without dropout
        has_lb = linear_bias is not None
        if rows:
            tile = TILING.ln_rows
            _dal_fwd_kernel[(triton.cdiv(rows, tile),)](
                x2,
                linear_bias if has_lb else weight,
                r2,
                weight,
                bias,
                out,
                z,
                mean,
                rstd,
                rows,
                n,
                x2.stride(0),
                r2.stride(0),
                out.stride(0),
                z.stride(0),
                eps,
                threshold,
                scale,
                seed,
                HAS_LINEAR_BIAS=has_lb,
                HAS_DROPOUT=has_dropout,
                BLOCK=block,
                ROWS=tile,
                num_warps=_ln_warps(tile, block, TILING.ln_elems_per_warp),
            )
        ctx.save_for_backward(z, weight, mean, rstd, seed)
        ctx.dropout = (threshold, scale, has_dropout)
        ctx.lb_dtype = linear_bias.dtype if has_lb else None
        ctx.x_dtype, ctx.r_dtype, ctx.shape = x.dtype, residual.dtype, x.shape
        ctx.residual_sink = residual_sink
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        z, weight, mean, rstd, seed = ctx.saved_tensors
        rows, n = z.shape
        block = _ln_block(n)
        threshold, scale, has_dropout = ctx.dropout
        has_lb = ctx.lb_dtype is not None
        d2 = _rows(dout)
        dx = torch.empty((rows, n), dtype=ctx.x_dtype, device=z.device)
        dr = torch.empty((rows, n), dtype=ctx.r_dtype, device=z.device)
        tile = TILING.ln_bwd_rows
        rows_per_prog = max(1, triton.cdiv(rows, TILING.ln_bwd_programs))
        n_prog = max(1, triton.cdiv(rows, rows_per_prog))
        # every program writes its whole row of partials: no memset needed unless nothing runs
        alloc = torch.empty if rows else torch.zeros
        part = alloc((3 if has_lb else 2, n_prog, n), dtype=torch.float32, device=z.device)
        if rows:
            _dal_bwd_kernel[(n_prog,)](
                d2,
                z,
                weight,
                mean,
                rstd,
                dx,
                dr,
                part,
                rows,
                n,
                rows_per_prog,
                d2.stride(0),
                z.stride(0),
                dx.stride(0),
                dr.stride(0),
                part.stride(0),
                threshold,
                scale,
                seed,
                HAS_LINEAR_BIAS=has_lb,
                HAS_DROPOUT=has_dropout,
                BLOCK=block,
                ROWS=tile,
                num_warps=_ln_warps(tile, block, TILING.ln_bwd_elems_per_warp),
            )
        sums = part.sum(1)  # one reduction for dW, dB (and d linear_bias)
        dlb = sums[2].to(ctx.lb_dtype) if has_lb else None
        dr = dr.view(ctx.shape)
        if ctx.residual_sink is not None and ctx.residual_sink.take(dr):
            dr = None  # handed over: the consumer adds it to the residual's other gradient itself
        return (dx.view(ctx.shape), dr, sums[0].to(weight.dtype), sums[1].to(weight.dtype), dlb, None, None, None, None)


def dropout_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    p: float,
    low_precision: bool = False,
    linear_bias: torch.Tensor | None = None,
    residual_sink: object | None = None,
) -> torch.Tensor:
    """LayerNorm(Dropout_p(x + linear_bias) + residual), with the output dtype mosaicbert_ds.ops.LayerNorm
    gives. residual_sink: an object whose take(grad) -> bool the backward offers the residual's
    gradient (a buffer it allocated, the consumer's to keep and modify); when it returns True the
    backward returns no gradient for the residual (mosaicbert_ds.ops.ResidualSplit)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        out_dtype = torch.get_autocast_dtype(device_type) if low_precision else torch.float32
    else:
        out_dtype = torch.promote_types(x.dtype, residual.dtype)
    return DropoutAddLayerNormFunction.apply(
        x, residual, weight, bias, linear_bias, float(eps), float(p), out_dtype, residual_sink
    )
