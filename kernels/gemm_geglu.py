"""GeGLU fused into the matmuls around it, in Triton: the MLP's GEMM epilogues.

Supports
    linear_geglu(x, w, approximate, p, seed) -> (h, out): h = x @ w^T (w of shape (2 * ff, K), rows
    [gate; up] as in MosaicBertMLP.Wi) and out = Dropout_p(GELU(h[:, :ff]) * h[:, ff:]), both from
    one kernel: each program computes a tile of the gate and the matching tile of up and applies
    the GeGLU in its epilogue, so h is written once and never read back.
    geglu_dgrad(dy, wo, h, approximate, p, seed) -> dh: the GeGLU's input gradient from the
    output gradient of the next linear (dy @ wo, wo of shape (d, ff) as in MosaicBertMLP.Wo)
    without writing dy @ wo to memory: the epilogue reads the tile's gate and up and writes both
    halves of dh.
    The dropout masks are those of kernels.fused.geglu for the same seed (same Philox counters per
    element), so either kernel pair may produce or consume them.
Limits
    2-D bf16 or fp16 operands with a unit last stride; ff a multiple of 8 and the column tile a
    divisor of 1024 (the mask's block). Rounding as in the unfused path: h and dy @ wo are rounded
    to the operand dtype before the GeGLU (so that forward, backward and the unfused kernels agree).
Tested
    Triton's interpreter on CPU against kernels.fused and float64 (tests/test_gemm_geglu.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .fused import _GEGLU_BLOCK, _check_approx, _dropout, _dropout_args, _gelu_and_grad


@dataclass(frozen=True)
class GemmTile:
    """A tile of the fused GEMMs: BM x BN outputs per program (the forward computes a BM x BN tile of
    the gate and one of up), K in steps of BK, `stages` deep software pipeline."""

    bm: int = 128
    bn: int = 128
    bk: int = 64
    stages: int = 3
    warps: int = 8
    group: int = 8  # row tiles that share a run of column tiles (L2 reuse of the weight)
    tma: bool = False  # operands and results through TMA descriptors (Hopper and later), not pointers
    prefetch: bool = False  # dgrad with TMA: load the GeGLU's input tile before the main loop
    persistent: bool = False  # one program per SM, descriptors made on the device (implies TMA)
    warp_specialize: bool = False  # persistent only: Triton's automatic warp specialization


FWD_TILE = GemmTile()
DGRAD_TILE = GemmTile(bn=256)


@triton.jit
def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP: tl.constexpr, pid=None):
    # grouped order: GROUP row tiles walk the column tiles together, so a weight tile stays in L2
    if pid is None:
        pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    per_group = GROUP * n_n
    first_m = (pid // per_group) * GROUP
    size = tl.minimum(n_m - first_m, GROUP)
    return first_m + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _geglu_epilogue(acc_g, acc_u, H, OUT, rm, rn, pid_n, M, ff, stride_h, stride_o, threshold, scale, SEED,
                    mask_blocks, APPROX_TANH: tl.constexpr, HAS_DROPOUT: tl.constexpr, BN: tl.constexpr):
    rows = rm.to(tl.int64)
    ok = (rm < M)[:, None] & (rn < ff)[None, :]
    gate, up = acc_g.to(H.dtype.element_ty), acc_u.to(H.dtype.element_ty)
    h = H + rows[:, None] * stride_h + rn[None, :]
    tl.store(h, gate, mask=ok)
    tl.store(h + ff, up, mask=ok)
    g, _ = _gelu_and_grad(gate.to(tl.float32), APPROX_TANH)
    out = _dropout(g * up.to(tl.float32), threshold, scale, SEED, rows * mask_blocks + pid_n, BN, HAS_DROPOUT)
    tl.store(OUT + rows[:, None] * stride_o + rn[None, :], out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _dgrad_epilogue(acc, H, DH, rm, rn, pid_n, M, ff, stride_h, stride_dh, threshold, scale, SEED, mask_blocks,
                    APPROX_TANH: tl.constexpr, HAS_DROPOUT: tl.constexpr, BN: tl.constexpr):
    rows = rm.to(tl.int64)
    ok = (rm < M)[:, None] & (rn < ff)[None, :]
    h = H + rows[:, None] * stride_h + rn[None, :]
    gate = tl.load(h, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h + ff, mask=ok, other=0.0).to(tl.float32)
    dout = acc.to(DH.dtype.element_ty).to(tl.float32)
    dout = _dropout(dout, threshold, scale, SEED, rows * mask_blocks + pid_n, BN, HAS_DROPOUT)
    g, dg = _gelu_and_grad(gate, APPROX_TANH)
    dh = DH + rows[:, None] * stride_dh + rn[None, :]
    tl.store(dh, (dout * up * dg).to(DH.dtype.element_ty), mask=ok)
    tl.store(dh + ff, (dout * g).to(DH.dtype.element_ty), mask=ok)


@triton.jit
def _linear_geglu_kernel(X, W, H, OUT, M, ff, K, stride_x, stride_w, stride_h, stride_o, threshold, scale, SEED,
                         mask_blocks, APPROX_TANH: tl.constexpr, HAS_DROPOUT: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, ff, BM, BN, GROUP)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    # out-of-range rows and columns read row 0 (unmasked loads pipeline better); never stored
    xs = X + tl.where(rm < M, rm, 0).to(tl.int64)[:, None] * stride_x + rk[None, :]
    ws = W + tl.where(rn < ff, rn, 0).to(tl.int64)[None, :] * stride_w + rk[:, None]  # (BK, BN) of w^T
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
        in_k = rk < K - k * BK
        a = tl.load(xs, mask=in_k[None, :], other=0.0)
        acc_g = tl.dot(a, tl.load(ws, mask=in_k[:, None], other=0.0), acc_g)
        acc_u = tl.dot(a, tl.load(ws + ff * stride_w, mask=in_k[:, None], other=0.0), acc_u)
        xs += BK
        ws += BK
    _geglu_epilogue(acc_g, acc_u, H, OUT, rm, rn, pid_n, M, ff, stride_h, stride_o, threshold, scale, SEED,
                    mask_blocks, APPROX_TANH, HAS_DROPOUT, BN)


@triton.jit
def _geglu_dgrad_kernel(DY, WO, H, DH, M, ff, K, stride_dy, stride_wo, stride_h, stride_dh, threshold, scale, SEED,
                        mask_blocks, APPROX_TANH: tl.constexpr, HAS_DROPOUT: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, ff, BM, BN, GROUP)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    dys = DY + tl.where(rm < M, rm, 0).to(tl.int64)[:, None] * stride_dy + rk[None, :]
    wos = WO + rk.to(tl.int64)[:, None] * stride_wo + tl.where(rn < ff, rn, 0)[None, :]  # (BK, BN) of wo
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
        in_k = rk < K - k * BK
        acc = tl.dot(tl.load(dys, mask=in_k[None, :], other=0.0), tl.load(wos, mask=in_k[:, None], other=0.0), acc)
        dys += BK
        wos += BK * stride_wo
    _dgrad_epilogue(acc, H, DH, rm, rn, pid_n, M, ff, stride_h, stride_dh, threshold, scale, SEED, mask_blocks,
                    APPROX_TANH, HAS_DROPOUT, BN)


@triton.jit
def _linear_geglu_tma_kernel(x_desc, w_desc, hg_desc, hu_desc, out_desc, M, ff, K, threshold, scale, SEED,
                             mask_blocks, APPROX_TANH: tl.constexpr, HAS_DROPOUT: tl.constexpr, BM: tl.constexpr,
                             BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr):
    # operands and results through TMA: loads zero-fill and stores clip past the edges, and the
    # stores go through shared memory in full lines (a store from the MMA layout writes 4-byte bits)
    pid_m, pid_n = _tile_ids(M, ff, BM, BN, GROUP)
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
        a = x_desc.load([pid_m * BM, k * BK])
        acc_g = tl.dot(a, w_desc.load([pid_n * BN, k * BK]).T, acc_g)
        acc_u = tl.dot(a, w_desc.load([ff + pid_n * BN, k * BK]).T, acc_u)
    gate, up = acc_g.to(hg_desc.dtype), acc_u.to(hg_desc.dtype)
    hg_desc.store([pid_m * BM, pid_n * BN], gate)
    hu_desc.store([pid_m * BM, pid_n * BN], up)
    g, _ = _gelu_and_grad(gate.to(tl.float32), APPROX_TANH)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    out = _dropout(g * up.to(tl.float32), threshold, scale, SEED, rows * mask_blocks + pid_n, BN, HAS_DROPOUT)
    out_desc.store([pid_m * BM, pid_n * BN], out.to(out_desc.dtype))


@triton.jit
def _geglu_dgrad_tma_kernel(dy_desc, wo_desc, hg_desc, hu_desc, dg_desc, du_desc, M, ff, K, threshold, scale, SEED,
                            mask_blocks, APPROX_TANH: tl.constexpr, HAS_DROPOUT: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr,
                            PREFETCH: tl.constexpr):
    pid_m, pid_n = _tile_ids(M, ff, BM, BN, GROUP)
    if PREFETCH:  # the tile's gate and up in flight while the main loop runs
        gate = hg_desc.load([pid_m * BM, pid_n * BN])
        up = hu_desc.load([pid_m * BM, pid_n * BN])
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
        acc = tl.dot(dy_desc.load([pid_m * BM, k * BK]), wo_desc.load([k * BK, pid_n * BN]), acc)
    if not PREFETCH:
        gate = hg_desc.load([pid_m * BM, pid_n * BN])
        up = hu_desc.load([pid_m * BM, pid_n * BN])
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    dout = acc.to(dg_desc.dtype).to(tl.float32)
    dout = _dropout(dout, threshold, scale, SEED, rows * mask_blocks + pid_n, BN, HAS_DROPOUT)
    g, dg = _gelu_and_grad(gate.to(tl.float32), APPROX_TANH)
    dg_desc.store([pid_m * BM, pid_n * BN], (dout * up.to(tl.float32) * dg).to(dg_desc.dtype))
    du_desc.store([pid_m * BM, pid_n * BN], (dout * g).to(du_desc.dtype))

@triton.jit
def _linear_geglu_ws_kernel(X, W, H, OUT, M, ff, K, threshold, scale, SEED, mask_blocks, APPROX_TANH: tl.constexpr,
                            HAS_DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            STAGES: tl.constexpr, GROUP: tl.constexpr, NUM_SMS: tl.constexpr, WS: tl.constexpr):
    # persistent: one program per SM walks the tiles; with WS Triton splits the loop into a TMA
    # producer and MMA/epilogue consumers, so one tile's epilogue overlaps the next tile's loads
    x_desc = tl.make_tensor_descriptor(X, [M, K], [K, 1], [BM, BK])
    w_desc = tl.make_tensor_descriptor(W, [2 * ff, K], [K, 1], [BN, BK])
    hg_desc = tl.make_tensor_descriptor(H, [M, ff], [2 * ff, 1], [BM, BN])
    hu_desc = tl.make_tensor_descriptor(H + ff, [M, ff], [2 * ff, 1], [BM, BN])
    out_desc = tl.make_tensor_descriptor(OUT, [M, ff], [ff, 1], [BM, BN])
    n_tiles = tl.cdiv(M, BM) * tl.cdiv(ff, BN)
    for tile in tl.range(tl.program_id(0), n_tiles, NUM_SMS, flatten=True, warp_specialize=WS):
        pid_m, pid_n = _tile_ids(M, ff, BM, BN, GROUP, tile)
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
            a = x_desc.load([pid_m * BM, k * BK])
            acc_g = tl.dot(a, w_desc.load([pid_n * BN, k * BK]).T, acc_g)
            acc_u = tl.dot(a, w_desc.load([ff + pid_n * BN, k * BK]).T, acc_u)
        gate, up = acc_g.to(OUT.dtype.element_ty), acc_u.to(OUT.dtype.element_ty)
        hg_desc.store([pid_m * BM, pid_n * BN], gate)
        hu_desc.store([pid_m * BM, pid_n * BN], up)
        g, _ = _gelu_and_grad(gate.to(tl.float32), APPROX_TANH)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        out = _dropout(g * up.to(tl.float32), threshold, scale, SEED, rows * mask_blocks + pid_n, BN, HAS_DROPOUT)
        out_desc.store([pid_m * BM, pid_n * BN], out.to(OUT.dtype.element_ty))


@triton.jit
def _geglu_dgrad_ws_kernel(DY, WO, H, DH, M, ff, K, threshold, scale, SEED, mask_blocks, APPROX_TANH: tl.constexpr,
                           HAS_DROPOUT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           STAGES: tl.constexpr, GROUP: tl.constexpr, NUM_SMS: tl.constexpr, WS: tl.constexpr):
    dy_desc = tl.make_tensor_descriptor(DY, [M, K], [K, 1], [BM, BK])
    wo_desc = tl.make_tensor_descriptor(WO, [K, ff], [ff, 1], [BK, BN])
    hg_desc = tl.make_tensor_descriptor(H, [M, ff], [2 * ff, 1], [BM, BN])
    hu_desc = tl.make_tensor_descriptor(H + ff, [M, ff], [2 * ff, 1], [BM, BN])
    dg_desc = tl.make_tensor_descriptor(DH, [M, ff], [2 * ff, 1], [BM, BN])
    du_desc = tl.make_tensor_descriptor(DH + ff, [M, ff], [2 * ff, 1], [BM, BN])
    n_tiles = tl.cdiv(M, BM) * tl.cdiv(ff, BN)
    for tile in tl.range(tl.program_id(0), n_tiles, NUM_SMS, flatten=True, warp_specialize=WS):
        pid_m, pid_n = _tile_ids(M, ff, BM, BN, GROUP, tile)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.range(0, tl.cdiv(K, BK), num_stages=STAGES):
            acc = tl.dot(dy_desc.load([pid_m * BM, k * BK]), wo_desc.load([k * BK, pid_n * BN]), acc)
        gate = hg_desc.load([pid_m * BM, pid_n * BN]).to(tl.float32)
        up = hu_desc.load([pid_m * BM, pid_n * BN]).to(tl.float32)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        dout = acc.to(DH.dtype.element_ty).to(tl.float32)
        dout = _dropout(dout, threshold, scale, SEED, rows * mask_blocks + pid_n, BN, HAS_DROPOUT)
        g, dg = _gelu_and_grad(gate, APPROX_TANH)
        dg_desc.store([pid_m * BM, pid_n * BN], (dout * up * dg).to(DH.dtype.element_ty))
        du_desc.store([pid_m * BM, pid_n * BN], (dout * g).to(DH.dtype.element_ty))


def _mask_blocks(ff: int, bn: int) -> int:
    """Row r's first mask block, in units of bn columns: fused.geglu lays out one Philox block per
    1024 columns of a row, so a tile of bn columns is block r * this + its column tile."""
    assert _GEGLU_BLOCK % bn == 0 and bn % 8 == 0, f"column tile {bn} must divide {_GEGLU_BLOCK} and hold 8k"
    return triton.cdiv(ff, _GEGLU_BLOCK) * (_GEGLU_BLOCK // bn)


def _check_2d(name: str, t: torch.Tensor) -> None:
    assert t.dim() == 2 and t.stride(-1) == 1, f"{name} must be 2-D with a unit last stride, got {tuple(t.shape)}"
    assert t.dtype in (torch.bfloat16, torch.float16), f"{name} must be bf16 or fp16, got {t.dtype}"


def _desc(t: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
    """A TMA descriptor of a 2-D view (its strides, so halves of a [gate; up] tensor work too)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, cols])


def _sms(t: torch.Tensor) -> int:
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 4


def _set_allocator(like: torch.Tensor) -> None:
    """Device-side descriptors need scratch memory: take it from torch's caching allocator."""
    assert like.is_contiguous(), "the persistent kernels take contiguous operands"
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=like.device))


def _grid(M: int, ff: int, tile: GemmTile) -> tuple[int]:
    return (triton.cdiv(M, tile.bm) * triton.cdiv(ff, tile.bn),)


def linear_geglu(x: torch.Tensor, w: torch.Tensor, approximate: str = "none", p: float = 0.0,
                 seed: torch.Tensor | None = None, tile: GemmTile | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, out, seed): h = x @ w^T and out = Dropout_p(GELU(gate) * up); seed is the one-element
    device tensor the mask came from (drawn when not given), for geglu_dgrad."""
    tanh = _check_approx(approximate)
    _check_2d("x", x), _check_2d("w", w)
    (M, K), ff = x.shape, w.shape[0] // 2
    assert w.shape == (2 * ff, K) and w.dtype == x.dtype, f"w must be ({2 * ff}, {K}) {x.dtype}, got {tuple(w.shape)}"
    has_dropout, threshold, scale, drawn = _dropout_args(p, x, draw=seed is None)
    seed = drawn if seed is None else seed
    h = torch.empty((M, 2 * ff), dtype=x.dtype, device=x.device)
    out = torch.empty((M, ff), dtype=x.dtype, device=x.device)
    t = tile or FWD_TILE
    if M and ff:
        meta = dict(APPROX_TANH=tanh, HAS_DROPOUT=has_dropout, BM=t.bm, BN=t.bn, BK=t.bk, STAGES=t.stages,
                    GROUP=t.group, num_warps=t.warps)
        tail = (h.stride(0), out.stride(0), threshold, scale, seed, _mask_blocks(ff, t.bn))
        if t.persistent:
            _set_allocator(x), _set_allocator(w)
            _linear_geglu_ws_kernel[(_sms(x),)](x, w, h, out, M, ff, K, *tail[2:], NUM_SMS=_sms(x),
                                                WS=t.warp_specialize, **meta)
        elif t.tma:
            _linear_geglu_tma_kernel[_grid(M, ff, t)](
                _desc(x, t.bm, t.bk), _desc(w, t.bn, t.bk), _desc(h[:, :ff], t.bm, t.bn), _desc(h[:, ff:], t.bm, t.bn),
                _desc(out, t.bm, t.bn), M, ff, K, *tail[2:], **meta)
        else:
            _linear_geglu_kernel[_grid(M, ff, t)](x, w, h, out, M, ff, K, x.stride(0), w.stride(0), *tail, **meta)
    return h, out, seed


def geglu_dgrad(dy: torch.Tensor, wo: torch.Tensor, h: torch.Tensor, approximate: str = "none", p: float = 0.0,
                seed: torch.Tensor | None = None, tile: GemmTile | None = None) -> torch.Tensor:
    """dh (M, 2 * ff): the gradient of Dropout_p(GELU(h[:, :ff]) * h[:, ff:]) given dy @ wo as its
    output gradient, with the mask of `seed` (the one linear_geglu or fused.geglu drew)."""
    tanh = _check_approx(approximate)
    for name, t in (("dy", dy), ("wo", wo), ("h", h)):
        _check_2d(name, t)
    (M, K), ff = dy.shape, wo.shape[1]
    assert wo.shape[0] == K and h.shape == (M, 2 * ff), (
        f"shapes: dy {tuple(dy.shape)}, wo {tuple(wo.shape)}, h {tuple(h.shape)}")
    has_dropout, threshold, scale, _ = _dropout_args(p, h, draw=False)
    if has_dropout:
        assert seed is not None, "dropout needs the forward's seed"
    dh = torch.empty_like(h)
    t = tile or DGRAD_TILE
    if M and ff:
        meta = dict(APPROX_TANH=tanh, HAS_DROPOUT=has_dropout, BM=t.bm, BN=t.bn, BK=t.bk, STAGES=t.stages,
                    GROUP=t.group, num_warps=t.warps)
        tail = (h.stride(0), dh.stride(0), threshold, scale, seed if has_dropout else h, _mask_blocks(ff, t.bn))
        if t.persistent:
            _set_allocator(dy), _set_allocator(wo), _set_allocator(h)
            _geglu_dgrad_ws_kernel[(_sms(dy),)](dy, wo, h, dh, M, ff, K, *tail[2:], NUM_SMS=_sms(dy),
                                                WS=t.warp_specialize, **meta)
        elif t.tma:
            _geglu_dgrad_tma_kernel[_grid(M, ff, t)](
                _desc(dy, t.bm, t.bk), _desc(wo, t.bk, t.bn), _desc(h[:, :ff], t.bm, t.bn),
                _desc(h[:, ff:], t.bm, t.bn), _desc(dh[:, :ff], t.bm, t.bn), _desc(dh[:, ff:], t.bm, t.bn),
                M, ff, K, *tail[2:], PREFETCH=t.prefetch, **meta)
        else:
            _geglu_dgrad_kernel[_grid(M, ff, t)](dy, wo, h, dh, M, ff, K, dy.stride(0), wo.stride(0), *tail, **meta)
    return dh
