"""The ALiBi slopes and the pure-PyTorch varlen attention against a float64 oracle."""

import math

import pytest
import torch

from mosaicbert_ds import alibi_slopes, flash_attn_varlen_func, varlen_attention_reference
from mosaicbert_ds.padding import cu_seqlens_from_lengths


def test_slopes_power_of_two_heads():
    # 16 heads: start = 2^(-8/16) = 2^-0.5, m_h = start^(h+1)
    expected = [2.0 ** (-0.5 * (h + 1)) for h in range(16)]
    assert torch.allclose(alibi_slopes(16).double(), torch.tensor(expected, dtype=torch.float64))


def test_slopes_twelve_heads_follow_the_paper():
    # 8-head slopes 2^-1..2^-8, then every other 16-head slope: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    exponents = [-1, -2, -3, -4, -5, -6, -7, -8, -0.5, -1.5, -2.5, -3.5]
    assert torch.equal(alibi_slopes(12), torch.tensor([2.0**e for e in exponents], dtype=torch.float32))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 20, 24])
def test_slopes_other_head_counts(n):
    s = alibi_slopes(n)
    assert s.shape == (n,) and (s > 0).all() and (s <= 1).all()
    assert len(set(s.tolist())) == n  # distinct per head


def dense_oracle(q, k, v, lengths, slopes, causal=False):
    """float64 softmax with an explicit ALiBi bias, one sequence at a time."""
    out, start = [], 0
    scale = 1.0 / math.sqrt(q.shape[-1])
    for n in lengths:
        qs, ks, vs = (t[start : start + n].double().transpose(0, 1) for t in (q, k, v))  # (H, n, D)
        s = qs @ ks.transpose(-1, -2) * scale
        i = torch.arange(n)
        s = s - slopes.double()[:, None, None] * (i[:, None] - i[None, :]).abs()
        if causal:
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append((torch.softmax(s, -1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_float64_softmax(causal):
    g = torch.Generator().manual_seed(0)
    lengths = [1, 7, 33, 1, 97, 33, 2]
    h, d = 3, 16
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, generator=g) for _ in range(3))
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    slopes = alibi_slopes(h)
    out = varlen_attention_reference(q, k, v, cu, cu, max(lengths), max(lengths), alibi_slopes=slopes, causal=causal)
    ref = dense_oracle(q, k, v, lengths, slopes, causal)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 1e-6, f"relative error {err:.2e}"
    assert torch.isfinite(out).all()


def test_reference_is_exact_in_float64_and_differentiable():
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 12]
    q, k, v = (torch.randn(sum(lengths), 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    slopes = alibi_slopes(2)
    out = varlen_attention_reference(q, k, v, cu, cu, 12, 12, alibi_slopes=slopes)
    ref = dense_oracle(q, k, v, lengths, slopes)
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b, c: varlen_attention_reference(a, b, c, cu, cu, 12, 12, alibi_slopes=slopes), (q, k, v)
    )


def test_sequences_do_not_see_each_other():
    g = torch.Generator().manual_seed(2)
    lengths = [4, 6]
    q, k, v = (torch.randn(10, 2, 8, generator=g) for _ in range(3))
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    out = flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, alibi_slopes=alibi_slopes(2))
    v2 = v.clone()
    v2[4:] += 100.0  # change only the second sequence
    out2 = flash_attn_varlen_func(q, k, v2, cu, cu, 6, 6, alibi_slopes=alibi_slopes(2))
    assert torch.equal(out[:4], out2[:4])
    assert not torch.allclose(out[4:], out2[4:])
