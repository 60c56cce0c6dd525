"""Fused elementwise kernels in Triton: GeGLU and dropout + residual add + LayerNorm.

Supports
    geglu(h, approximate): h (..., 2 * ff) -> GELU(h[..., :ff]) * h[..., ff:], GELU exact ("none")
    or tanh-approximated ("tanh"); any float dtype; one kernel forward, one backward.
    dropout_add_layer_norm(x, residual, weight, bias, eps, p, low_precision):
    LayerNorm(Dropout_p(x) + residual) over the last dimension (up to 16384 features), the
    dtypes of mosaicbert_ds.ops: under autocast the output is the autocast dtype when
    low_precision, else fp32 (what autocast's layer_norm returns); without autocast the
    promoted dtype of x and residual. Statistics always in fp32.
Limits
    Dropout draws from Triton's Philox (tl.rand) seeded from torch's CPU generator: masks are
    reproducible under torch.manual_seed but differ from torch.nn.functional.dropout's.
    The backward regenerates the mask from the seed instead of storing it.
Tested
    Triton's interpreter on CPU (triton 3.6, 3.8); compiled on one NVIDIA H200 (triton 3.6).
Known risks
    Rows longer than 16384 features are rejected (one row per program, held in registers).
"""

from __future__ import annotations

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
def _geglu_fwd_kernel(H, OUT, ff, stride_h, stride_o, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < ff
    gate = tl.load(H + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(H + row * stride_h + ff + cols, mask=ok, other=0.0).to(tl.float32)
    g, _ = _gelu_and_grad(gate, APPROX_TANH)
    tl.store(OUT + row * stride_o + cols, (g * up).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _geglu_bwd_kernel(H, DOUT, DH, ff, stride_h, stride_do, stride_dh, APPROX_TANH: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < ff
    gate = tl.load(H + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(H + row * stride_h + ff + cols, mask=ok, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + row * stride_do + cols, mask=ok, other=0.0).to(tl.float32)
    g, dg = _gelu_and_grad(gate, APPROX_TANH)
    tl.store(DH + row * stride_dh + cols, (dout * up * dg).to(DH.dtype.element_ty), mask=ok)
    tl.store(DH + row * stride_dh + ff + cols, (dout * g).to(DH.dtype.element_ty), mask=ok)


@triton.jit
def _dal_fwd_kernel(X, R, W, B, OUT, Z, MEAN, RSTD, n_cols, stride_x, stride_r, stride_o, stride_z,
                    eps, p, scale, seed, HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(seed, (row * n_cols + cols).to(tl.int32)) >= p
        x = tl.where(keep, x * scale, 0.0)
    z = x + tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(z, 0) / n_cols
    zc = tl.where(ok, z - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (zc * rstd * w + b).to(OUT.dtype.element_ty), mask=ok)
    tl.store(Z + row * stride_z + cols, z.to(Z.dtype.element_ty), mask=ok)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _dal_bwd_kernel(DOUT, Z, W, MEAN, RSTD, DX, DR, DW_PART, DB_PART, n_rows, n_cols, rows_per_prog,
                    stride_do, stride_z, stride_dx, stride_dr, p, scale, seed,
                    HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    # each program takes a run of rows and leaves its partial dW, dB in one row of *_PART
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_prog
    first = row_start.to(tl.int64)
    for i in range(0, tl.minimum(rows_per_prog, n_rows - row_start)):
        row = first + i
        dout = tl.load(DOUT + row * stride_do + cols, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(Z + row * stride_z + cols, mask=ok, other=0.0).to(tl.float32)
        xhat = tl.where(ok, (z - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
        g = dout * w
        dz = (g - tl.sum(g, 0) / n_cols - xhat * (tl.sum(g * xhat, 0) / n_cols)) * tl.load(RSTD + row)
        tl.store(DR + row * stride_dr + cols, dz.to(DR.dtype.element_ty), mask=ok)
        if HAS_DROPOUT:
            keep = tl.rand(seed, (row * n_cols + cols).to(tl.int32)) >= p
            dz = tl.where(keep, dz * scale, 0.0)
        tl.store(DX + row * stride_dx + cols, dz.to(DX.dtype.element_ty), mask=ok)
        dw += dout * xhat
        db += dout
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=ok)
    tl.store(DB_PART + pid * n_cols + cols, db, mask=ok)


# ----------------------------------------------------------------------------------------------
# Host launchers and autograd
# ----------------------------------------------------------------------------------------------

_GEGLU_BLOCK = 1024


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (rows, n) with a contiguous last dimension, copying only when needed."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check_approx(approximate: str) -> bool:
    assert approximate in ("none", "tanh"), f"approximate must be 'none' or 'tanh', got {approximate!r}"
    return approximate == "tanh"


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, approximate: str) -> torch.Tensor:
        tanh = _check_approx(approximate)
        assert h.shape[-1] % 2 == 0, f"the last dimension must be even (gate; up), got {h.shape[-1]}"
        h2 = _rows(h)
        rows, ff = h2.shape[0], h2.shape[1] // 2
        out = torch.empty((rows, ff), dtype=h.dtype, device=h.device)
        if rows and ff:
            _geglu_fwd_kernel[(rows, triton.cdiv(ff, _GEGLU_BLOCK))](
                h2, out, ff, h2.stride(0), out.stride(0), APPROX_TANH=tanh, BLOCK=_GEGLU_BLOCK, num_warps=4)
        ctx.save_for_backward(h2)
        ctx.tanh, ctx.shape = tanh, h.shape
        return out.view(*h.shape[:-1], ff)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (h2,) = ctx.saved_tensors
        rows, ff = h2.shape[0], h2.shape[1] // 2
        d2 = _rows(dout)
        dh = torch.empty_like(h2)
        if rows and ff:
            _geglu_bwd_kernel[(rows, triton.cdiv(ff, _GEGLU_BLOCK))](
                h2, d2, dh, ff, h2.stride(0), d2.stride(0), dh.stride(0), APPROX_TANH=ctx.tanh,
                BLOCK=_GEGLU_BLOCK, num_warps=4)
        return dh.view(ctx.shape), None


def geglu(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(h[..., :ff]) * h[..., ff:] for h (..., 2 * ff), differentiable."""
    return GeGLUFunction.apply(h, approximate)


class DropoutAddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float, p: float, out_dtype: torch.dtype) -> torch.Tensor:
        assert x.shape == residual.shape, f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ"
        n = x.shape[-1]
        assert weight.shape == (n,) and bias.shape == (n,), "weight and bias must be (hidden,)"
        assert 0.0 <= p <= 1.0, f"dropout probability must be in [0, 1], got {p}"
        block = triton.next_power_of_2(n)
        assert block <= 16384, f"hidden size {n} is above this kernel's 16384"
        x2, r2 = _rows(x), _rows(residual)
        rows = x2.shape[0]
        out = torch.empty((rows, n), dtype=out_dtype, device=x.device)
        z = torch.empty((rows, n), dtype=out_dtype, device=x.device)  # pre-norm sum, for backward
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        has_dropout = p > 0.0
        scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if has_dropout else 0  # CPU: no device sync
        warps = min(16, max(1, block // 256))
        if rows:
            _dal_fwd_kernel[(rows,)](x2, r2, weight, bias, out, z, mean, rstd, n, x2.stride(0), r2.stride(0),
                                     out.stride(0), z.stride(0), eps, p, scale, seed,
                                     HAS_DROPOUT=has_dropout, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(z, weight, mean, rstd)
        ctx.p, ctx.scale, ctx.seed, ctx.has_dropout = p, scale, seed, has_dropout
        ctx.x_dtype, ctx.r_dtype, ctx.shape = x.dtype, residual.dtype, x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        z, weight, mean, rstd = ctx.saved_tensors
        rows, n = z.shape
        block = triton.next_power_of_2(n)
        d2 = _rows(dout)
        dx = torch.empty((rows, n), dtype=ctx.x_dtype, device=z.device)
        dr = torch.empty((rows, n), dtype=ctx.r_dtype, device=z.device)
        rows_per_prog = max(1, triton.cdiv(rows, 1024))
        n_prog = max(1, triton.cdiv(rows, rows_per_prog))
        dw_part = torch.zeros((n_prog, n), dtype=torch.float32, device=z.device)
        db_part = torch.zeros((n_prog, n), dtype=torch.float32, device=z.device)
        if rows:
            _dal_bwd_kernel[(n_prog,)](d2, z, weight, mean, rstd, dx, dr, dw_part, db_part, rows, n, rows_per_prog,
                                       d2.stride(0), z.stride(0), dx.stride(0), dr.stride(0),
                                       ctx.p, ctx.scale, ctx.seed, HAS_DROPOUT=ctx.has_dropout, BLOCK=block,
                                       num_warps=min(16, max(1, block // 256)))
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(weight.dtype)
        return dx.view(ctx.shape), dr.view(ctx.shape), dw, db, None, None, None


def dropout_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float, p: float, low_precision: bool = False) -> torch.Tensor:
    """LayerNorm(Dropout_p(x) + residual), with the output dtype mosaicbert_ds.ops.LayerNorm gives."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        out_dtype = torch.get_autocast_dtype(device_type) if low_precision else torch.float32
    else:
        out_dtype = torch.promote_types(x.dtype, residual.dtype)
    return DropoutAddLayerNormFunction.apply(x, residual, weight, bias, float(eps), float(p), out_dtype)
