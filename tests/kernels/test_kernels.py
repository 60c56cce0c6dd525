"""The Triton kernels (mosaicbert_ds.kernels) against float64 references.

On a machine without CUDA every test here runs through Triton's interpreter (TRITON_INTERPRET=1,
set below before the kernels are imported) on small odd shapes, with forced small block sizes so
the multi-block paths run. On a GPU the same tests run compiled at full size and carry the `gpu`
marker (`pytest -m gpu tests/kernels/test_kernels.py`), and the GPU-only tests check every block
configuration the tuner may pick.

Errors are relative Frobenius norms against float64 PyTorch on the same inputs; the kernel must
be within about twice the error of PyTorch in the kernel's own dtype.
"""

from __future__ import annotations

import importlib
import math
import os
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers.triton_interp import DEVICE, ON_GPU, enter_interpreter, fresh_process_test, rel_err, runs_in_process  # noqa: E402

_INTERPRET_BEFORE = enter_interpreter()
if ON_GPU:
    # every candidate configuration is tested on its own below; elsewhere take the default
    os.environ.setdefault("MOSAICBERT_FLASH_TUNE", "0")

from mosaicbert_ds.attention import alibi_slopes, varlen_attention_reference  # noqa: E402
from mosaicbert_ds.ops import LayerNorm  # noqa: E402
from mosaicbert_ds.padding import cu_seqlens_from_lengths  # noqa: E402


def _interpreter_bf16_like_gpu() -> None:
    """Make Triton's interpreter (3.6 to 3.8) treat bf16 as the GPU does: it hands bf16 tl.dot
    operands to numpy as raw uint16 bits (widen them to fp32 first, exactly), and it truncates
    fp32 -> bf16 casts where the GPU rounds to nearest even (which doubles the rounding error)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "bf16_like_gpu", False):
        return
    create_dot, cast_impl = builder.create_dot, builder.cast_impl

    def widen(x):
        if x.dtype == tl.bfloat16 and x.data.dtype == np.uint16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def dot(self, a, b, *args, **kwargs):
        return create_dot(self, widen(a), widen(b), *args, **kwargs)

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16 and src.data.dtype == np.float32:
            bits = src.data.view(np.uint32).astype(np.uint64)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
            return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    builder.create_dot, builder.cast_impl, builder.bf16_like_gpu = dot, cast, True


def _load_kernels():
    import mosaicbert_ds.kernels as package
    from mosaicbert_ds.kernels import flash_attn, fused

    if IN_PROCESS and not ON_GPU:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(flash_attn._fwd_kernel, InterpretedFunction):  # imported earlier, compiled
            flash_attn, fused = importlib.reload(flash_attn), importlib.reload(fused)
            importlib.reload(package)
        _interpreter_bf16_like_gpu()
    return flash_attn, fused


IN_PROCESS = runs_in_process(_INTERPRET_BEFORE)
fa, fused = _load_kernels()
# GPU: every test here runs compiled and is marked for `pytest -m gpu`. CPU: every test runs in the
# interpreter, in this process when possible, else all of them in a new one.
pytestmark = [pytest.mark.gpu] if ON_GPU else []
_interpreted_here, test_in_fresh_interpreter = fresh_process_test(__file__, IN_PROCESS, timeout=900)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def make_qkv(lengths: list[int], heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """Packed (T, 3, H, D) qkv with O(1) scores, cu_seqlens, max_seqlen and an output gradient."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    total = sum(lengths)
    qkv = torch.randn(total, 3, heads, head_dim, device=DEVICE, generator=g).to(dtype)
    dout = torch.randn(total, heads, head_dim, device=DEVICE, generator=g).to(dtype)
    cu = cu_seqlens_from_lengths(torch.tensor(lengths)).to(DEVICE)
    return qkv, cu, max(lengths), dout


def reference(
    qkv: torch.Tensor,
    cu: torch.Tensor,
    max_seqlen: int,
    dout: torch.Tensor,
    causal: bool,
    slopes: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and d(qkv) of the PyTorch reference run in `dtype` (float64 for the oracle)."""
    x = qkv.detach().to(dtype).requires_grad_(True)
    q, k, v = x.unbind(1)
    out = varlen_attention_reference(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=causal, alibi_slopes=slopes)
    out.backward(dout.to(dtype))
    return out.detach(), x.grad


def kernel_poisoned(
    qkv: torch.Tensor, cu: torch.Tensor, max_seqlen: int, dout: torch.Tensor, causal: bool, slopes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The launchers on NaN-filled output buffers: any element left unwritten shows up as NaN."""
    q, k, v = qkv.unbind(1)  # token stride 3*H*D: the model's layout, read in place
    scale = q.shape[-1] ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"), dtype=torch.float32, device=q.device)
    fa.flash_attn_varlen_fwd(q, k, v, cu, max_seqlen, scale, causal, slopes, out=out, lse=lse)
    assert not lse.isnan().any(), "logsumexp left unwritten"
    dqkv = torch.full(qkv.shape, float("nan"), dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = dqkv.unbind(1)
    fa.flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu, max_seqlen, scale, causal, slopes, dq, dk, dv)
    return out, dqkv


def check_against_oracle(
    out, dqkv, qkv, cu, max_seqlen, dout, causal, slopes, label: str, conditioned: bool = True
) -> dict[str, float]:
    """Errors of out, dq, dk, dv against float64; at most twice PyTorch's in the same dtype and,
    for well-conditioned inputs, under an absolute cap per dtype."""
    ref_out, ref_d = reference(qkv, cu, max_seqlen, dout, causal, slopes, torch.float64)
    same_out, same_d = reference(qkv, cu, max_seqlen, dout, causal, slopes, qkv.dtype)
    cap = (2e-2 if qkv.dtype == torch.bfloat16 else 3e-3) if conditioned else math.inf
    errors = {}
    for name, x, ref, same in [("out", out, ref_out, same_out)] + [
        (n, dqkv[:, i], ref_d[:, i], same_d[:, i]) for i, n in enumerate(("dq", "dk", "dv"))
    ]:
        assert not x.isnan().any(), f"{label}: {name} has NaN (unwritten or 0/0)"
        err, torch_err = rel_err(x, ref), rel_err(same, ref)
        errors[name] = err
        errors[name + "_torch"] = torch_err
        worst = (x.double() - ref).abs().flatten().argmax().item()
        assert err <= max(2 * torch_err, 1e-3) and err <= cap, (
            f"{label}: {name} error {err:.2e} vs PyTorch {qkv.dtype} {torch_err:.2e} (cap {cap:.0e}); "
            f"worst at flat index {worst}: {x.flatten()[worst].item():.4g} vs {ref.flatten()[worst].item():.4g}"
        )
    return errors


# ----------------------------------------------------------------------------------------------
# attention: shapes and configurations
# ----------------------------------------------------------------------------------------------

if ON_GPU:
    _g = torch.Generator().manual_seed(1234)
    LENGTHS = [1, 2, 7, 33, 97, 127, 128, 129, 255, 511, 513, 1000, 1025, 2047, 2048, 1] + torch.randint(
        1, 2049, (16,), generator=_g
    ).tolist()
    HEADS = 12
    SMALL = [1, 7, 33, 97, 300, 64, 1]
else:
    LENGTHS = [1, 7, 33, 97]
    HEADS = 2
    SMALL = [1, 7, 33]

F_, B_ = fa.FwdConfig, fa.BwdConfig
# (dtype, head_dim, causal, alibi, interpreter-only forced configs): small blocks make 97 tokens
# span several blocks, so the masked tails, the atomic dQ and the separate dQ kernel all run.
CASES = [  # id, dtype, head_dim, causal, alibi, forced configs in the interpreter, run on GPU too
    ("bf16-d64-alibi", torch.bfloat16, 64, False, True, (F_(32, 32, 4, 1), B_(32, 32, 4, 1, "atomic")), True),
    ("bf16-d32-alibi-store", torch.bfloat16, 32, False, True, (F_(16, 64, 4, 1), B_(16, 128, 4, 1, "store")), False),
    ("bf16-d32-alibi", torch.bfloat16, 32, False, True, (F_(32, 16, 4, 1), B_(16, 32, 4, 1, "kernel", 32, 16)), True),
    ("fp16-d64-alibi-causal", torch.float16, 64, True, True, (F_(32, 32, 4, 1), B_(16, 32, 4, 1, "atomic")), True),
    (
        "bf16-d64-alibi-causal-store",
        torch.bfloat16,
        64,
        True,
        True,
        (F_(32, 16, 4, 1), B_(32, 128, 4, 1, "store")),
        False,
    ),
    ("bf16-d32-causal", torch.bfloat16, 32, True, False, (F_(16, 32, 4, 1), B_(32, 16, 4, 1, "kernel", 16, 32)), True),
    ("fp16-d128-alibi", torch.float16, 128, False, True, None, True),
    ("bf16-d64", torch.bfloat16, 64, False, False, (F_(32, 32, 4, 1), B_(32, 32, 4, 1, "atomic")), True),
]
if ON_GPU:  # compiled, the forced small configs add nothing: every real candidate is tested below
    CASES = [c for c in CASES if c[-1]]


@pytest.fixture
def forced():
    def force(configs):
        if configs is not None and not ON_GPU:
            fa.force_config(*configs)

    yield force
    fa.force_config()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_attention_matches_float64(case, forced):
    name, dtype, head_dim, causal, alibi, configs, _ = case
    forced(configs)
    lengths = LENGTHS if head_dim != 128 else SMALL
    qkv, cu, max_seqlen, dout = make_qkv(lengths, HEADS, head_dim, dtype, seed=zlib.crc32(name.encode()) % 1000)
    slopes = alibi_slopes(HEADS).to(DEVICE) if alibi else None
    out, dqkv = kernel_poisoned(qkv, cu, max_seqlen, dout, causal, slopes)
    errors = check_against_oracle(out, dqkv, qkv, cu, max_seqlen, dout, causal, slopes, name)
    print(name, {k: f"{v:.2e}" for k, v in errors.items()})


def test_autograd_paths_agree_with_launchers(forced):
    """flash_attn_varlen_func on unbind views, on contiguous copies, the qkv-packed function and the
    package dispatch (impl="triton") all give the launchers' results."""
    forced((F_(32, 32, 4, 1), B_(32, 32, 4, 1, "atomic")))
    from mosaicbert_ds.attention import flash_attn_varlen_func as dispatch

    qkv, cu, max_seqlen, dout = make_qkv(SMALL, HEADS, 32, torch.bfloat16, seed=7)
    slopes = alibi_slopes(HEADS).to(DEVICE)
    out_ref, d_ref = kernel_poisoned(qkv, cu, max_seqlen, dout, False, slopes)

    def views(x):
        return x.unbind(1)

    def copies(x):
        return [t.contiguous() for t in x.unbind(1)]

    def projected_views(x):  # as the model: slices of a non-leaf (T, 3*H*D) projection output
        return (x.flatten(1) * 1).unflatten(1, x.shape[1:]).unbind(1)

    assert fa._packed_base(*projected_views(qkv)) is not None and fa._packed_base(*copies(qkv)) is None
    assert fa._packed_base(*qkv[:-1].unbind(1)) is None  # slices of a larger tensor
    for label, split in [("views", views), ("copies", copies), ("projected", projected_views)]:
        x = qkv.clone().requires_grad_(True)
        q, k, v = split(x)
        out = fa.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, alibi_slopes=slopes)
        out.backward(dout)
        assert rel_err(out, out_ref) < 1e-6, label
        assert rel_err(x.grad, d_ref) < 1e-3, label  # atomic dQ: summation order may differ
    x = qkv.clone().requires_grad_(True)
    out = fa.flash_attn_varlen_qkvpacked_func(x, cu, max_seqlen, alibi_slopes=slopes)
    out.backward(dout)
    assert rel_err(out, out_ref) < 1e-6 and rel_err(x.grad, d_ref) < 1e-3
    x = qkv.clone().requires_grad_(True)
    q, k, v = x.unbind(1)
    out = dispatch(q, k, v, cu, cu, max_seqlen, max_seqlen, alibi_slopes=slopes, impl="triton")
    out.backward(dout)
    assert rel_err(out, out_ref) < 1e-6 and rel_err(x.grad, d_ref) < 1e-3


def test_length_one_sequences_only():
    """Every query sees only itself: out = v exactly, dv = dout, dq = dk = 0 (up to the rounding of
    p = exp2(s - lse) and dp - delta, both computed twice), no NaN."""
    qkv, cu, max_seqlen, dout = make_qkv([1] * 5, HEADS, 64, torch.bfloat16, seed=3)
    out, dqkv = kernel_poisoned(qkv, cu, max_seqlen, dout, False, alibi_slopes(HEADS).to(DEVICE))
    assert torch.equal(out, qkv[:, 2])
    torch.testing.assert_close(dqkv[:, 2], dout, rtol=1e-2, atol=1e-5)
    assert dqkv[:, :2].abs().max() < 1e-4


@pytest.mark.parametrize("dq_mode", ["atomic", "kernel"])
@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
def test_no_overflow_from_keys_past_the_end(alibi, dq_mode, forced):
    """Scores of -128 everywhere give lse ~ -185 (base 2); a key past a sequence's end (zero
    padding inside a block) would score 0 and exp2(0 - lse) overflows: it must be masked, in
    the dK/dV kernel (which also makes dQ under "atomic") and in the dQ kernel."""
    forced((F_(32, 32, 4, 1), B_(16, 32, 4, 1, dq_mode, 16, 32)))
    lengths = [37, 5, 50]
    qkv, cu, max_seqlen, dout = make_qkv(lengths, HEADS, 64, torch.bfloat16, seed=5)
    sign = torch.randint(0, 2, (1, HEADS, 64), device=DEVICE).to(torch.bfloat16) * 2 - 1
    # q.k * 64**-0.5 = -128 +- 2 for every pair (the spread keeps dq away from zero)
    qkv[:, 0], qkv[:, 1] = 4 * sign, -4 * sign + 0.5 * qkv[:, 1]
    slopes = alibi_slopes(HEADS).to(DEVICE) if alibi else None
    out, dqkv = kernel_poisoned(qkv, cu, max_seqlen, dout, False, slopes)
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    # scores of 128 in bf16 inputs: PyTorch itself is off by ~1e-1 here, so only the 2x rule applies
    check_against_oracle(out, dqkv, qkv, cu, max_seqlen, dout, False, slopes, f"far-keys-{alibi}", conditioned=False)


def test_rejections():
    qkv, cu, max_seqlen, _ = make_qkv([3, 5], HEADS, 32, torch.bfloat16, seed=0)
    q, k, v = qkv.unbind(1)
    with pytest.raises(ValueError, match="dropout"):
        fa.flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=0.1)
    other = cu_seqlens_from_lengths(torch.tensor([4, 4])).to(DEVICE)
    with pytest.raises(NotImplementedError, match="self-attention"):
        fa.flash_attn_varlen_func(q, k, v, cu, other, max_seqlen, max_seqlen)
    with pytest.raises(AssertionError, match="head_dim"):
        x = torch.randn(8, 2, 48, device=DEVICE, dtype=torch.bfloat16)
        fa.flash_attn_varlen_func(x, x, x, cu, cu, max_seqlen, max_seqlen)


def test_buckets_and_candidates_are_consistent(monkeypatch):
    assert [fa._bucket(n) for n in (1, 16, 17, 100, 128, 129, 2048, 4096)] == [16, 16, 32, 128, 128, 256, 2048, 4096]
    for bucket in (16, 64, 128, 256, 1024, 4096, 16384):
        for head_dim in (32, 64, 128):
            for c in fa.bwd_candidates(bucket, head_dim) + fa.wide_bwd_candidates(bucket, head_dim):
                assert c.dq_mode != "store" or c.block_n >= bucket, (bucket, head_dim, c)
                assert c.dq_mode != "kernel" or (c.dq_block_m and c.dq_block_n), c
    default, wide = fa.fwd_candidates(2048, 64), fa.wide_fwd_candidates(2048, 64)
    assert fa._with_wide(default, wide) == default  # the grid only on request
    monkeypatch.setenv("MOSAICBERT_FLASH_CANDIDATES", "wide")
    merged = fa._with_wide(default, wide)
    assert merged[: len(default)] == default and len(merged) == len(set(merged)) > len(default)


# the regimes of benchmarks/attention.py with 8192 tokens: same kernel specialisations, small oracle
CANDIDATE_CASES = [
    (bucket, i)
    for bucket, n in ((64, 32), (128, 128), (512, 512), (2048, 2048))
    for i in range(max(len(fa.fwd_candidates(bucket, 64)), len(fa.bwd_candidates(bucket, 64))))
]


@pytest.mark.parametrize("bucket,index", CANDIDATE_CASES, ids=[f"{b}-{i}" for b, i in CANDIDATE_CASES])
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_every_candidate_configuration(bucket, index, forced):
    from benchmarks.attention import Regime, regime_lengths

    fwd_c, bwd_c = fa.fwd_candidates(bucket, 64), fa.bwd_candidates(bucket, 64)
    fa.force_config(fwd_c[index % len(fwd_c)], bwd_c[index % len(bwd_c)])
    lengths = regime_lengths(Regime(str(bucket), bucket, 0.6), total_tokens=8192, seed=index)
    qkv, cu, max_seqlen, dout = make_qkv(lengths, 12, 64, torch.bfloat16, seed=index)
    slopes = alibi_slopes(12).to(DEVICE)
    out, dqkv = kernel_poisoned(qkv, cu, max_seqlen, dout, False, slopes)
    errors = check_against_oracle(out, dqkv, qkv, cu, max_seqlen, dout, False, slopes, f"{bucket}-{index}")
    print(bucket, fwd_c[index % len(fwd_c)], bwd_c[index % len(bwd_c)], {k: f"{v:.2e}" for k, v in errors.items()})


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_long_sequences():
    """max_seqlen 4096 (and a ragged 4095) next to short ones, default configuration."""
    qkv, cu, max_seqlen, dout = make_qkv([4096, 3, 4095, 1, 700], 12, 64, torch.bfloat16, seed=13)
    slopes = alibi_slopes(12).to(DEVICE)
    out, dqkv = kernel_poisoned(qkv, cu, max_seqlen, dout, False, slopes)
    errors = check_against_oracle(out, dqkv, qkv, cu, max_seqlen, dout, False, slopes, "4096")
    print("4096", {k: f"{v:.2e}" for k, v in errors.items()})


def test_odd_long_length_with_the_long_configurations():
    """A sequence of 1031 tokens (bucket 2048: the long-sequence defaults, first candidates of
    both passes, so every block is exercised with a ragged last one) next to a short one. On the
    CPU this runs in the interpreter, at 2 heads of 32."""
    heads, head_dim = (12, 64) if ON_GPU else (2, 32)
    qkv, cu, max_seqlen, dout = make_qkv([1031, 3], heads, head_dim, torch.bfloat16, seed=21)
    assert fa._bucket(max_seqlen) == 2048
    fa.force_config(fa.fwd_candidates(2048, head_dim)[0], fa.bwd_candidates(2048, head_dim)[0])
    try:
        slopes = alibi_slopes(heads).to(DEVICE)
        out, dqkv = kernel_poisoned(qkv, cu, max_seqlen, dout, False, slopes)
    finally:
        fa.force_config()
    errors = check_against_oracle(out, dqkv, qkv, cu, max_seqlen, dout, False, slopes, "1031")
    print("1031", {k: f"{v:.2e}" for k, v in errors.items()})


@pytest.mark.parametrize("dq_mode", ["kernel", "atomic"])
def test_alibi_reach_skips_only_what_vanishes(dq_mode, forced, monkeypatch):
    """MOSAICBERT_FLASH_ALIBI_REACH=1: key (and query) blocks beyond ALiBi's reach are skipped. With
    the 2^-40 margin the result is as close to float64 as the full computation (CPU: head 0 has
    slope 1/2, a reach of about 80 tokens in sequences of 300, blocks of 32); with a margin of
    -200 (every program keeps only its own neighbourhood) the gentle head visibly loses mass, so
    the ranges are in force."""
    monkeypatch.setenv("MOSAICBERT_FLASH_ALIBI_REACH", "1")
    if ON_GPU:
        lengths, heads, head_dim = [4100, 300, 2048, 7], 12, 64
        slopes = alibi_slopes(12).to(DEVICE)
    else:
        monkeypatch.setattr(fa, "REACH_MIN_SEQLEN", 64)
        forced((F_(32, 32, 4, 1), B_(32, 32, 4, 1, dq_mode, 32, 32)))
        lengths, heads, head_dim = [300, 7, 200], 2, 32
        slopes = torch.tensor([0.5, 0.02], device=DEVICE)
    qkv, cu, max_seqlen, dout = make_qkv(lengths, heads, head_dim, torch.bfloat16, seed=31)
    out, dqkv = kernel_poisoned(qkv, cu, max_seqlen, dout, False, slopes)
    errors = check_against_oracle(out, dqkv, qkv, cu, max_seqlen, dout, False, slopes, f"reach-{dq_mode}")
    print("reach", dq_mode, {k: f"{v:.2e}" for k, v in errors.items()})
    monkeypatch.setattr(fa, "ALIBI_SKIP_BITS", -200.0)
    out_short, dqkv_short = kernel_poisoned(qkv, cu, max_seqlen, dout, False, slopes)
    ref_out, ref_d = reference(qkv, cu, max_seqlen, dout, False, slopes, torch.float64)
    for i, name in enumerate(("dq", "dk")):
        assert rel_err(dqkv_short[:, i], ref_d[:, i]) > 10 * errors[name], name
    assert rel_err(out_short, ref_out) > 10 * errors["out"]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("length", [1031, 2048, 4100, 8192])
def test_long_sequences_match_float64(length):
    """Long sequences (odd, power of two, just past one) beside short ones, the default
    configuration of their bucket, 12 heads of 64, against float64: output and every gradient."""
    qkv, cu, max_seqlen, dout = make_qkv([length, 5, 300, 1], 12, 64, torch.bfloat16, seed=length)
    slopes = alibi_slopes(12).to(DEVICE)
    out, dqkv = kernel_poisoned(qkv, cu, max_seqlen, dout, False, slopes)
    errors = check_against_oracle(out, dqkv, qkv, cu, max_seqlen, dout, False, slopes, str(length))
    print(length, {k: f"{v:.2e}" for k, v in errors.items()})


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_tuner_picks_a_candidate_and_stays_correct(monkeypatch):
    monkeypatch.setenv("MOSAICBERT_FLASH_TUNE", "1")
    monkeypatch.setattr(fa, "_chosen", {})  # earlier tests cached untuned defaults
    qkv, cu, max_seqlen, dout = make_qkv([128] * 40 + [50, 3], 12, 64, torch.bfloat16, seed=11)
    slopes = alibi_slopes(12).to(DEVICE)
    out, dqkv = kernel_poisoned(qkv, cu, max_seqlen, dout, False, slopes)
    check_against_oracle(out, dqkv, qkv, cu, max_seqlen, dout, False, slopes, "tuned")
    picked = {k[0]: v for k, v in fa.chosen_configs().items() if k[1] == 128 and k[2] == 64}
    assert picked["fwd"] in fa.fwd_candidates(128, 64) and picked["bwd"] in fa.bwd_candidates(128, 64)


# ----------------------------------------------------------------------------------------------
# fused elementwise kernels
# ----------------------------------------------------------------------------------------------

ROWS, HIDDEN, FF = (4096, 768, 3072) if ON_GPU else (7, 96, 100)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_geglu_matches_definition(approximate, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h = (2 * torch.randn(3, ROWS, 2 * FF, device=DEVICE, generator=g)).to(dtype)
    dout = torch.randn(3, ROWS, FF, device=DEVICE, generator=g).to(dtype)

    def definition(x):
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=approximate) * up

    results = {}
    for label, fn, t in [
        ("kernel", lambda x: fused.geglu(x, approximate), h),
        ("torch", definition, h),
        ("fp64", definition, h.double()),
    ]:
        x = t.detach().clone().requires_grad_(True)
        out = fn(x)
        out.backward(dout.to(out.dtype))
        results[label] = (out.detach(), x.grad)
    assert results["kernel"][0].dtype == dtype and results["kernel"][0].shape == (3, ROWS, FF)
    for i, what in enumerate(("out", "grad")):
        err = rel_err(results["kernel"][i], results["fp64"][i])
        torch_err = rel_err(results["torch"][i], results["fp64"][i])
        assert err <= max(2 * torch_err, 1e-6), f"geglu {what}: {err:.2e} vs torch {torch_err:.2e}"


def _ln_case(dtype_x, dtype_r, seed, hidden=HIDDEN):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(ROWS, hidden, device=DEVICE, generator=g).to(dtype_x)
    r = (3 + 2 * torch.randn(ROWS, hidden, device=DEVICE, generator=g)).to(dtype_r)
    ln = LayerNorm(hidden, eps=1e-12).to(DEVICE)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.1, generator=g)
        ln.bias.normal_(0.0, 0.1, generator=g)
    dout = torch.randn(ROWS, hidden, device=DEVICE, generator=g)
    return x, r, ln, dout


# (autocast, low_precision, x dtype, residual dtype): the model's two settings under bf16 autocast
# (residual fp32 after an fp32 LayerNorm, bf16 after a low-precision one) and plain fp32
LN_CASES = [
    (True, False, torch.bfloat16, torch.float32),
    (True, True, torch.bfloat16, torch.bfloat16),
    (False, False, torch.float32, torch.float32),
]


@pytest.mark.parametrize(
    "autocast,low_precision,dtype_x,dtype_r", LN_CASES, ids=["autocast-fp32ln", "autocast-bf16ln", "fp32"]
)
def test_dropout_add_layer_norm_matches_definition(autocast, low_precision, dtype_x, dtype_r):
    x, r, ln, dout = _ln_case(dtype_x, dtype_r, seed=1)
    ln.low_precision = low_precision
    results = {}
    for label in ("kernel", "torch"):
        xs, rs = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
        ln.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            if label == "kernel":
                out = fused.dropout_add_layer_norm(xs, rs, ln.weight, ln.bias, ln.eps, 0.0, low_precision)
            else:
                out = ln(F.dropout(xs, p=0.0) + rs)
        out.backward(dout.to(out.dtype))
        results[label] = (out.detach(), xs.grad, rs.grad, ln.weight.grad.clone(), ln.bias.grad.clone())
    ts = [t.detach().double().requires_grad_(True) for t in (x, r, ln.weight, ln.bias)]
    ref = F.layer_norm(ts[0] + ts[1], (HIDDEN,), ts[2], ts[3], ln.eps)
    ref.backward(dout.double())
    oracle = (ref.detach(),) + tuple(t.grad for t in ts)
    k_out, t_out = results["kernel"][0], results["torch"][0]
    assert k_out.dtype == t_out.dtype, f"output dtype {k_out.dtype}, the definition gives {t_out.dtype}"
    for i, what in enumerate(("out", "dx", "dresidual", "dweight", "dbias")):
        k, t = results["kernel"][i], results["torch"][i]
        assert k.dtype == t.dtype, f"{what}: dtype {k.dtype} vs {t.dtype}"
        err, torch_err = rel_err(k, oracle[i]), rel_err(t, oracle[i])
        assert err <= max(2 * torch_err, 1e-5), f"{what}: {err:.2e} vs torch {torch_err:.2e}"


# ----------------------------------------------------------------------------------------------
# dropout inside the fused kernels: one Philox counter per eight elements, a 16-bit number each,
# kept when >= t = round(p * 65536), kept values scaled by 65536 / (65536 - t)
# ----------------------------------------------------------------------------------------------

# GeGLU shapes for the dropout statistics: in the interpreter ff = 1500 spans two 1024-element
# blocks per row (the second ragged), so block ids and counter offsets past the first block run
DROP_ROWS, DROP_FF = (4096, 3072) if ON_GPU else (64, 1500)
LEVELS = 65536


def _effective(p: float) -> tuple[int, float, float]:
    """(t, q, scale): the threshold, the effective drop probability t / 65536 and the scale."""
    t = round(p * LEVELS)
    return t, t / LEVELS, LEVELS / (LEVELS - t)


def _philox4x32(seed: int, counters: np.ndarray) -> np.ndarray:
    """tl.randint4x(seed, counters) for int32 counters (Philox 4x32, 10 rounds, as in Triton):
    counters (...) -> (..., 4) uint32. Independent of Triton, to pin down the element order."""
    m32 = np.uint64(0xFFFFFFFF)
    c0 = counters.astype(np.int64).astype(np.uint64) & m32
    c1, c2, c3 = np.zeros_like(c0), np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    key_a, key_b, round_a, round_b = (np.uint64(v) for v in (0x9E3779B9, 0xBB67AE85, 0xD2511F53, 0xCD9E8D57))
    for _ in range(10):
        pa, pb = round_a * c0, round_b * c2  # 32 x 32 -> 64 bits: no overflow in uint64
        c0, c1, c2, c3 = (pb >> np.uint64(32)) ^ c1 ^ k0, pb & m32, (pa >> np.uint64(32)) ^ c3 ^ k1, pa & m32
        k0, k1 = (k0 + key_a) & m32, (k1 + key_b) & m32
    return np.stack([c0, c1, c2, c3], -1).astype(np.uint32)


def _reference_keep(seed: int, t: int, rows: int, cols: int, block: int) -> torch.Tensor:
    """The mask the kernels must draw for a (rows, cols) output cut into blocks of `block` per row:
    element e of block b takes counter b * (block // 8) + e // 8, word (e % 8) // 2, the low 16
    bits for even e and the high 16 for odd e; kept when that number is >= t."""
    per_row = -(-cols // block)
    r, c = np.arange(rows)[:, None], np.arange(cols)[None, :]
    e = c % block
    words = _philox4x32(seed, (r * per_row + c // block) * (block // 8) + e // 8)
    word = np.take_along_axis(words, np.broadcast_to((e % 8) // 2, (rows, cols))[..., None], -1)[..., 0]
    number = (word >> (16 * (e % 2)).astype(np.uint32)) & 0xFFFF
    return torch.from_numpy(number >= t).to(DEVICE)


def _seed_drawn_after(torch_seed: int) -> int:
    """The seed the kernels draw (torch.randint on the device) right after torch.manual_seed."""
    torch.manual_seed(torch_seed)
    return int(torch.randint(0, 2**31 - 1, (1,), device=DEVICE).item())


def _geglu_input(rows: int, ff: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h with every GLU output nonzero (so 0 in the output means dropped), and an output gradient."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h = 0.5 + 1.5 * torch.rand(rows, 2 * ff, device=DEVICE, generator=g)
    return h, torch.randn(rows, ff, device=DEVICE, generator=g)


def _assert_scaled_exactly(out: torch.Tensor, plain: torch.Tensor, keep: torch.Tensor, scale: float) -> None:
    """out = plain * scale (one fp32 multiply) where kept, 0 elsewhere; bit-exact in the
    interpreter, within 1e-6 relative compiled (where the GELU code of the two kernel variants
    might contract into FMAs differently). 1 / (1 - p) instead of 65536 / (65536 - t) differs by
    ~7e-6 relative at p = 0.1: caught either way."""
    expected = torch.where(keep, plain * torch.tensor(scale, dtype=torch.float32, device=DEVICE), 0.0)
    tol = dict(rtol=1e-6, atol=0.0) if ON_GPU else dict(rtol=0.0, atol=0.0)
    torch.testing.assert_close(out, expected, **tol)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_add_layer_norm_dropout(p):
    """Kept fraction within 5 sigma of 1 - t/65536; kept inputs scaled by 65536/(65536-t); the
    forward and the backward use the same mask; two calls draw different masks."""
    t, q, scale = _effective(p)
    x, r, ln, dout = _ln_case(torch.float32, torch.float32, seed=2)
    xs, rs = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    out = fused.dropout_add_layer_norm(xs, rs, ln.weight, ln.bias, ln.eps, p)
    out.backward(dout)
    keep = xs.grad != 0
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - q)) < 5 * math.sqrt(q * (1 - q) / n)
    # d out / d x = keep * scale * d out / d residual
    torch.testing.assert_close(xs.grad, rs.grad * keep * scale, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        expected = F.layer_norm(x * keep * scale + r, (HIDDEN,), ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-4)
    xs2 = x.clone().requires_grad_(True)
    fused.dropout_add_layer_norm(xs2, r, ln.weight, ln.bias, ln.eps, p).backward(dout)
    assert not torch.equal(xs2.grad != 0, keep)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_geglu_dropout(p):
    """The fused GLU-output dropout keeps 1 - t/65536 of the outputs (5 sigma), scales them by
    exactly 65536/(65536-t), and the backward applies the forward's mask: the gradient is zero
    exactly where the output was dropped, and elsewhere the gradient of the kept, scaled output."""
    t, q, scale = _effective(p)
    h, dout = _geglu_input(min(DROP_ROWS, 24), DROP_FF, seed=5)
    hs = h.clone().requires_grad_(True)
    out = fused.geglu(hs, "none", p)
    out.backward(dout)
    out = out.detach()
    plain = fused.geglu(h, "none")
    assert (plain != 0).all()
    keep = out != 0
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - q)) < 5 * math.sqrt(q * (1 - q) / n)
    _assert_scaled_exactly(out, plain, keep, scale)
    for half in (hs.grad[:, :DROP_FF], hs.grad[:, DROP_FF:]):  # d gate, d up
        assert torch.equal(half == 0, ~keep)
    hp = h.clone().requires_grad_(True)
    fused.geglu(hp, "none").backward(dout * keep * scale)
    torch.testing.assert_close(hs.grad, hp.grad)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_geglu_dropout_mask_matches_philox_reference(p):
    """The mask is the one the counter layout promises (an independent NumPy Philox): every
    element its own 16-bit number, blocks on disjoint counters, seed drawn as torch.manual_seed
    dictates. Rows span two blocks here in the interpreter (ff = 1500, BLOCK = 1024)."""
    t, _, _ = _effective(p)
    rows = min(DROP_ROWS, 16)
    h, _ = _geglu_input(rows, DROP_FF, seed=9)
    torch.manual_seed(123)
    keep = fused.geglu(h, "none", p) != 0
    expected = _reference_keep(_seed_drawn_after(123), t, rows, DROP_FF, fused._GEGLU_BLOCK)
    assert torch.equal(keep, expected), f"{(keep != expected).sum().item()} of {keep.numel()} elements differ"


@pytest.mark.parametrize("hidden", [5, 8, HIDDEN], ids=["h5-block8", "h8", f"h{HIDDEN}"])
def test_layer_norm_dropout_mask_matches_philox_reference(hidden):
    """The same for the LayerNorm kernels (one row per block of max(8, next power of two)
    elements), including rows narrower than one counter's eight elements; the backward's mask
    (dx = 0 exactly where dropped) is the forward's."""
    p = 0.5
    t, _, scale = _effective(p)
    x, r, ln, dout = _ln_case(torch.float32, torch.float32, seed=3, hidden=hidden)
    xs = x.clone().requires_grad_(True)
    torch.manual_seed(321)
    out = fused.dropout_add_layer_norm(xs, r, ln.weight, ln.bias, ln.eps, p)
    out.backward(dout)
    block = max(8, 1 << (hidden - 1).bit_length())  # the next power of two, at least 8
    expected = _reference_keep(_seed_drawn_after(321), t, ROWS, hidden, block)
    assert torch.equal(xs.grad != 0, expected)
    with torch.no_grad():
        ref = F.layer_norm(x * expected * scale + r, (hidden,), ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-4)


def test_dropout_masks_follow_the_seed():
    """The same torch seed gives the same mask (forward and backward alike), a different one a
    different mask; in both kernels."""
    h, dout = _geglu_input(8, 256, seed=1)
    masks = []
    for torch_seed in (7, 7, 8):
        hs = h.clone().requires_grad_(True)
        torch.manual_seed(torch_seed)
        out = fused.geglu(hs, "none", 0.3)
        out.backward(dout)
        assert torch.equal(hs.grad[:, 256:] == 0, out == 0)
        masks.append(out != 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    x, r, ln, dout = _ln_case(torch.float32, torch.float32, seed=4)
    masks = []
    for torch_seed in (7, 7, 8):
        xs = x.clone().requires_grad_(True)
        torch.manual_seed(torch_seed)
        fused.dropout_add_layer_norm(xs, r, ln.weight, ln.bias, ln.eps, 0.3).backward(dout)
        masks.append(xs.grad != 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_neighbours_are_independent(p):
    """The two 16-bit halves of one Philox word (elements 2i, 2i+1) and other near neighbours
    (lags 1 to 16: the same word, the same counter, adjacent counters) are dropped together as
    often as independent draws would be, P(both) = q^2; each half alone drops with q."""
    t, q, _ = _effective(p)
    h, _ = _geglu_input(DROP_ROWS, DROP_FF, seed=11)
    torch.manual_seed(99)
    drop = (fused.geglu(h, "none", p) == 0).cpu()
    lo, hi = drop[:, 0::2], drop[:, 1::2]  # the low and high halves of one word (ff, BLOCK even)
    n = lo.numel()
    for half in (lo, hi):
        assert abs(half.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / n)
    both = (lo & hi).float().mean().item()
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n), (both, q * q)
    for lag in range(1, 17):
        pairs = drop[:, :-lag] & drop[:, lag:]
        m = pairs.numel()
        # overlapping pairs are (lag)-dependent: a variance at most ~3x the independent one's
        sigma = math.sqrt(3 * q * q * (1 - q * q) / m)
        assert abs(pairs.float().mean().item() - q * q) < 5 * sigma, (lag, pairs.float().mean().item(), q * q)


def test_dropout_threshold_edges():
    """t = round(p * 65536): a p that rounds to t = 0 is no dropout at all (scale 1, no seed
    drawn, outputs bit-identical to p = 0); t = 1 drops with probability 2**-16; p = 1 drops
    everything; p outside [0, 1] is refused."""
    like = torch.zeros(1, device=DEVICE)
    assert fused._dropout_args(0.0, like)[:3] == (False, 0, 1.0)
    assert fused._dropout_args(2**-18, like)[:3] == (False, 0, 1.0)
    assert fused._dropout_args(1.0 / LEVELS, like)[:3] == (True, 1, LEVELS / (LEVELS - 1))
    assert fused._dropout_args(0.1, like)[:3] == (True, 6554, LEVELS / (LEVELS - 6554))
    assert fused._dropout_args(1.0, like)[:3] == (True, LEVELS, 0.0)
    for bad in (-0.1, 1.5):
        with pytest.raises(AssertionError, match="dropout probability"):
            fused._dropout_args(bad, like)

    h, dout = _geglu_input(8, 256, seed=2)
    x, r, ln, ddout = _ln_case(torch.float32, torch.float32, seed=5)
    tiny = 1e-6  # t = round(0.0655...) = 0
    grads = {}
    for p in (0.0, tiny, 1.0):
        hs, xs = h.clone().requires_grad_(True), x.clone().requires_grad_(True)
        state = torch.random.get_rng_state()
        out_g = fused.geglu(hs, "none", p)
        out_l = fused.dropout_add_layer_norm(xs, r, ln.weight, ln.bias, ln.eps, p)
        drew_seed = not torch.equal(state, torch.random.get_rng_state())
        out_g.backward(dout)
        out_l.backward(ddout)
        grads[p] = (out_g.detach(), hs.grad, out_l.detach(), xs.grad)
        if not ON_GPU:  # the seed is drawn on the CPU generator only here
            assert drew_seed == (p == 1.0), p
    for a, b in zip(grads[0.0], grads[tiny]):
        assert torch.equal(a, b)
    out_g, dh, out_l, dx = grads[1.0]
    assert not out_g.any() and not dh.any() and not dx.any()
    with torch.no_grad():
        ref = F.layer_norm(r, (HIDDEN,), ln.weight, ln.bias, ln.eps)
    torch.testing.assert_close(out_l, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "autocast,low_precision,dtype_x,dtype_r", LN_CASES, ids=["autocast-fp32ln", "autocast-bf16ln", "fp32"]
)
def test_linear_bias_inside_layer_norm(autocast, low_precision, dtype_x, dtype_r):
    """LayerNorm(x + linear_bias + residual): output and all five gradients (the linear bias's is
    the column sum of dx) against float64, within twice PyTorch's own error."""
    x, r, ln, dout = _ln_case(dtype_x, dtype_r, seed=6)
    ln.low_precision = low_precision
    lb = torch.randn(HIDDEN, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(7))
    results = {}
    for label in ("kernel", "torch"):
        xs, rs, lbs = x.clone().requires_grad_(True), r.clone().requires_grad_(True), lb.clone().requires_grad_(True)
        ln.zero_grad()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            if label == "kernel":
                out = fused.dropout_add_layer_norm(
                    xs, rs, ln.weight, ln.bias, ln.eps, 0.0, low_precision, linear_bias=lbs
                )
            else:
                out = ln(xs + lbs.to(xs.dtype) + rs)
        out.backward(dout.to(out.dtype))
        results[label] = (out.detach(), xs.grad, rs.grad, ln.weight.grad.clone(), ln.bias.grad.clone(), lbs.grad)
    ts = [t.detach().double().requires_grad_(True) for t in (x, r, ln.weight, ln.bias, lb)]
    ref = F.layer_norm(ts[0] + ts[4] + ts[1], (HIDDEN,), ts[2], ts[3], ln.eps)
    ref.backward(dout.double())
    oracle = (ref.detach(),) + tuple(t.grad for t in ts)
    for i, what in enumerate(("out", "dx", "dresidual", "dweight", "dbias", "dlinear_bias")):
        k, t = results["kernel"][i], results["torch"][i]
        assert k.dtype == t.dtype, f"{what}: dtype {k.dtype} vs {t.dtype}"
        err, torch_err = rel_err(k, oracle[i]), rel_err(t, oracle[i])
        assert err <= max(2 * torch_err, 1e-5), f"{what}: {err:.2e} vs torch {torch_err:.2e}"


def test_linear_bias_gradient_sees_the_dropout_mask():
    x, r, ln, dout = _ln_case(torch.float32, torch.float32, seed=8)
    lb = torch.zeros(HIDDEN, device=DEVICE, requires_grad=True)
    xs = x.clone().requires_grad_(True)
    fused.dropout_add_layer_norm(xs, r, ln.weight, ln.bias, ln.eps, 0.3, linear_bias=lb).backward(dout)
    assert rel_err(lb.grad, xs.grad.sum(0)) < 1e-5  # fp32 column sums over ROWS rows, in another order
    assert (xs.grad == 0).any()


# tilings the fused kernels must agree under: rows per program that do not divide the row count,
# several rows per LayerNorm-backward iteration, programs that get no rows or a ragged run
TILINGS = [
    dict(geglu_rows=4, geglu_warps=8, geglu_bwd_rows=2, ln_rows=4, ln_bwd_rows=2, ln_bwd_programs=3),
    dict(
        geglu_rows=2,
        geglu_bwd_rows=4,
        geglu_bwd_warps=2,
        ln_rows=8,
        ln_elems_per_warp=1024,
        ln_bwd_rows=4,
        ln_bwd_programs=ROWS + 5,
        ln_bwd_elems_per_warp=64,
    ),
]


@pytest.mark.parametrize("tiling", TILINGS, ids=["a", "b"])
def test_fused_kernels_do_not_depend_on_the_tiling(tiling, monkeypatch):
    """Rows per program, warps and program counts only schedule the work: the dropout masks and
    the GeGLU results are bitwise those of the default tiling. The LayerNorm results agree to
    rounding (compiled, a row's sums are reduced in an order that depends on the warps; bitwise
    in the interpreter), as do the column sums (weight, bias and linear-bias gradients)."""
    x, r, ln, dout = _ln_case(torch.float32, torch.float32, seed=11)
    lb = torch.randn(HIDDEN, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(12))
    h, dh_out = _geglu_input(ROWS, FF, seed=13)

    def run():
        torch.manual_seed(5)
        xs, rs, lbs, hs = (t.clone().requires_grad_(True) for t in (x, r, lb, h))
        ln.zero_grad()
        out_l = fused.dropout_add_layer_norm(xs, rs, ln.weight, ln.bias, ln.eps, 0.3, linear_bias=lbs)
        out_l.backward(dout)
        out_g = fused.geglu(hs, "none", 0.3)
        out_g.backward(dh_out)
        return {
            "geglu out": out_g.detach(),
            "dh": hs.grad,
            "ln out": out_l.detach(),
            "dx": xs.grad,
            "dresidual": rs.grad,
            "dweight": ln.weight.grad.clone(),
            "dbias": ln.bias.grad.clone(),
            "dlinear_bias": lbs.grad,
        }

    a = run()
    monkeypatch.setattr(fused, "TILING", fused.Tiling(**tiling))
    b = run()
    assert torch.equal(a["dx"] == 0, b["dx"] == 0) and (a["dx"] == 0).any(), "LayerNorm dropout mask"
    assert (a["geglu out"] == 0).any(), "GeGLU dropout dropped nothing"
    for what in a:
        if what in ("geglu out", "dh") or (not ON_GPU and what in ("ln out", "dx", "dresidual")):
            assert torch.equal(a[what], b[what]), what
        elif what in ("ln out", "dx", "dresidual"):
            torch.testing.assert_close(a[what], b[what], rtol=1e-5, atol=1e-5, msg=what)
        else:  # fp32 sums over all rows in another order
            assert rel_err(b[what], a[what]) < 1e-5, what


# ----------------------------------------------------------------------------------------------
# the residual's gradient handed from the LayerNorm kernel's backward to the first linear
# (mosaicbert_ds.ops.ResidualSplit); on the CPU the model's ops are pointed at the interpreter
# ----------------------------------------------------------------------------------------------


def _fused_ops_here(monkeypatch) -> None:
    from mosaicbert_ds import ops

    if not ON_GPU:
        monkeypatch.setattr(ops, "kernels_for", lambda t, on, name="fused": fused if on and name == "fused" else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_residual_gradient_handed_to_the_first_linear(dtype, monkeypatch):
    """x -> linear -> tanh -> linear + bias -> LayerNorm(. + x): x's two gradients summed inside
    the first linear's addmm match autograd's sum of the PyTorch ops."""
    from mosaicbert_ds import ops

    _fused_ops_here(monkeypatch)
    x0, _, ln, dout = _ln_case(dtype, dtype, seed=21)
    g = torch.Generator(device=DEVICE).manual_seed(22)
    lin, proj = torch.nn.Linear(HIDDEN, 2 * HIDDEN), torch.nn.Linear(2 * HIDDEN, HIDDEN)
    modules = [m.to(DEVICE, dtype) for m in (lin, proj, ln)]
    with torch.no_grad():
        for m in modules[:2]:
            for p in m.parameters():
                p.copy_(0.2 * torch.randn(p.shape, device=DEVICE, generator=g))

    def run(on: bool):
        x = x0.clone().requires_grad_(True)
        for m in modules:
            m.zero_grad()
        split = ops.ResidualSplit(x, on)
        h = torch.tanh(split.linear(lin))
        ops.linear_dropout_add_layer_norm(h, proj, x, ln, 0.0, True, on, split.sink).backward(dout.to(dtype))
        return split, [x.grad] + [p.grad for m in modules for p in m.parameters()]

    split, got = run(True)
    assert split.sink is not None and split.sink.fused
    _, want = run(False)
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < (1e-5 if dtype == torch.float32 else 1e-2), i


def test_model_hands_every_residual_gradient_over(monkeypatch):
    """The model with the fused kernels (fp32, dropout off): every sublayer's first linear takes its
    residual's gradient in, and loss and gradients match the PyTorch ops."""
    from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM, ops

    boxes = []

    class Spy(ops._Box):
        def __init__(self):
            super().__init__()
            boxes.append(self)

    _fused_ops_here(monkeypatch)
    monkeypatch.setattr(ops, "_Box", Spy)
    torch.manual_seed(0)
    model = MosaicBertForMaskedLM(MosaicBertConfig.from_name("tiny", hidden_dropout_prob=0.0)).to(DEVICE).train()
    lens = torch.tensor([9, 1, 5, 12])
    ids = torch.randint(5, 900, (int(lens.sum()),), device=DEVICE)
    labels = torch.where(torch.arange(ids.numel(), device=DEVICE) % 3 == 0, ids, -100)
    cu = cu_seqlens_from_lengths(lens).to(DEVICE)
    results = []
    for on in (True, False):
        for module in model.modules():
            if hasattr(module, "fused"):
                module.fused = on
        model.zero_grad()
        loss = model(ids, cu_seqlens=cu, max_seqlen=12, labels=labels).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(boxes) == 2 * model.config.num_hidden_layers and all(b.fused for b in boxes)
    (loss_f, grads_f), (loss_t, grads_t) = results
    assert abs(loss_f - loss_t) < 1e-5 * abs(loss_t)
    for name, g in grads_t.items():
        assert rel_err(grads_f[name], g) < 1e-4, name


def test_ops_hooks_take_the_fused_path():
    """mosaicbert_ds.ops calls the fused kernels with the arguments they expect (CUDA only there)."""
    from mosaicbert_ds import ops

    if not ON_GPU:
        pytest.skip("ops.py takes the fused path only for CUDA tensors")
    h = torch.randn(64, 2 * FF, device=DEVICE, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.geglu(h, "gelu", fused=True), ops.geglu(h, "gelu", fused=False))
    x, r, ln, _ = _ln_case(torch.bfloat16, torch.bfloat16, seed=4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = ops.dropout_add_layer_norm(x, r, ln, 0.1, training=False, fused=True)
        b = ops.dropout_add_layer_norm(x, r, ln, 0.1, training=False, fused=False)
    assert a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
