"""Fused cross-entropy in Triton for the masked-LM loss: no fp32 copy of the logits.

Supports
    cross_entropy(logits, labels, ignore_index=-100): logits (M, V) in bf16, fp16 or fp32 (any V,
    sized for a vocabulary of up to ~64k), labels (M,) integer. Returns the fp32 scalar
    F.cross_entropy(logits.float(), labels, ignore_index=ignore_index) (mean over the rows whose
    label is not ignore_index), differentiable w.r.t. logits only.
    Forward: one pass over the logits (online max and sum-exp in fp32), keeping only the
    per-row logsumexp (M fp32) for backward. Backward: one more read of the logits and one write of
    d logits in the logits' dtype, (softmax - onehot) * d loss / n_valid, zero on ignored rows.
    Ignored rows are not read at all. n_valid and d loss stay on the device: no host sync.
    Rows may be strided (stride(-1) == 1, any stride(0)); other layouts are copied first.
Limits
    Like PyTorch: the loss is nan when every label is ignored (the gradient is then zero) and when
    M == 0 (no kernel is launched). A label outside [0, V) other than ignore_index is not checked
    (that would need a sync): its row's loss is nan, so the mean is nan.
Tested
    Triton's interpreter on CPU (triton 3.8); compiled on one NVIDIA H200 (triton 3.6, torch 2.11),
    where at M=8192, V=30528, bf16 forward + backward took 0.42 ms against 3.1 ms for
    F.cross_entropy(logits.float()), with 0.47 GiB of extra peak memory (the bf16 gradient)
    against 2.8 GiB, and no host sync (torch.cuda.set_sync_debug_mode("error")).
Known risks
    Only the fp32 logsumexp is kept, so softmax = exp(x - lse) carries lse's rounding: a relative
    error up to |lse| * 2**-24, 6e-6 at |logits| ~ 100, which PyTorch's log_softmax avoids.
    The fp32 row losses are summed by torch in its own order: not bit-identical to PyTorch's
    loss, same fp32 rounding level. +inf or nan logits give a nan loss, as in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_fwd_kernel(LOGITS, LABELS, LSE, LOSS, n_cols, stride_row, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    base = LOGITS + row * stride_row
    cols = tl.arange(0, BLOCK)
    # online logsumexp with a scalar running max: on an H200 about 10 % faster than a running max
    # per lane (no reduction per block, but more registers)
    m = -3.0e38  # finite: an all-masked block never computes -inf - -inf
    total = 0.0
    for start in range(0, n_cols, BLOCK):
        ok = (start + cols < n_cols) & valid  # ignored rows issue no loads
        x = tl.load(base + start + cols, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(tl.where(valid, total, 1.0))  # total >= 1 on a valid row, 0 on an ignored one
    in_range = valid & (label >= 0) & (label < n_cols)
    target = tl.load(base + label, mask=in_range, other=0.0).to(tl.float32)
    target = tl.where(in_range, target, float("nan"))  # a bad label poisons the mean, like an error
    tl.store(LSE + row, tl.where(valid, lse, 0.0))
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))


@triton.jit
def _ce_bwd_kernel(
    LOGITS, LABELS, LSE, DLOSS, N_VALID, DLOGITS, n_cols, stride_row, stride_drow, ignore_index, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    # d loss and n_valid are read here rather than on the host, which would sync the step;
    # n_valid == 0 means no row is valid, so clamping it changes nothing but avoids 0/0
    scale = tl.where(valid, tl.load(DLOSS).to(tl.float32) / tl.maximum(tl.load(N_VALID), 1.0), 0.0)
    lse = tl.load(LSE + row)
    base = LOGITS + row * stride_row
    dbase = DLOGITS + row * stride_drow
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        ok = c < n_cols
        x = tl.load(base + c, mask=ok & valid, other=float("-inf")).to(tl.float32)  # ignored rows: p = 0
        g = (tl.exp(x - lse) - tl.where(c == label, 1.0, 0.0)) * scale
        tl.store(dbase + c, g.to(DLOGITS.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Host launchers and autograd
# ----------------------------------------------------------------------------------------------

_BLOCK = 4096  # V=30528 -> 8 blocks per row; tests lower it to run the multi-block path on small V
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _launch_config(n_cols: int, backward: bool) -> tuple[int, int]:
    # (BLOCK, num_warps) measured best on an H200 at M=8192, V=30528 in bf16
    block = min(_BLOCK, triton.next_power_of_2(n_cols))
    warps = 8 if backward else 4
    return block, max(1, min(warps, block // 256))


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        assert logits.dim() == 2, f"logits must be (M, V), got {tuple(logits.shape)}"
        assert logits.dtype in _DTYPES, f"logits dtype must be bf16, fp16 or fp32, got {logits.dtype}"
        rows, n_cols = logits.shape
        assert n_cols > 0, "logits need at least one class"
        assert labels.shape == (rows,), f"labels must be ({rows},), got {tuple(labels.shape)}"
        assert not labels.is_floating_point() and labels.device == logits.device, "labels: integer, same device"
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        y = labels.contiguous()
        n_valid = (y != ignore_index).sum(dtype=torch.float32)  # on device; 0 -> 0/0 = nan, as PyTorch
        lse = torch.empty(rows, dtype=torch.float32, device=x.device)
        row_loss = torch.empty(rows, dtype=torch.float32, device=x.device)
        if rows:
            block, warps = _launch_config(n_cols, backward=False)
            _ce_fwd_kernel[(rows,)](
                x, y, lse, row_loss, n_cols, x.stride(0), ignore_index, BLOCK=block, num_warps=warps
            )
        ctx.save_for_backward(x, y, lse, n_valid)
        ctx.ignore_index = ignore_index
        return row_loss.sum() / n_valid

    @staticmethod
    def backward(ctx, dloss: torch.Tensor):
        x, y, lse, n_valid = ctx.saved_tensors
        rows, n_cols = x.shape
        dx = torch.empty((rows, n_cols), dtype=x.dtype, device=x.device)
        if rows:
            block, warps = _launch_config(n_cols, backward=True)
            _ce_bwd_kernel[(rows,)](
                x,
                y,
                lse,
                dloss.float().contiguous(),
                n_valid,
                dx,
                n_cols,
                x.stride(0),
                dx.stride(0),
                ctx.ignore_index,
                BLOCK=block,
                num_warps=warps,
            )
        return dx, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(logits.float(), labels, ignore_index=ignore_index) as an fp32 scalar, without
    an fp32 copy of the (M, V) logits or of their gradient."""
    return CrossEntropyFunction.apply(logits, labels, int(ignore_index))
