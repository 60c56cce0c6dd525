"""FLOP counts: the paper's Appendix H formula and the exact matmul count, against a hand count."""

import torch

from mosaicbert_ds import MosaicBertConfig, MosaicBertForMaskedLM
from mosaicbert_ds.flops import mfu, paper_flops_per_token, training_flops


def test_appendix_h_formula_against_a_hand_count_for_the_tiny_model():
    cfg = MosaicBertConfig.from_name("tiny")  # 2 layers, d=64, 2 heads, GLU ff=128, vocab 1024
    d, ff, v, layers = 64, 128, 1024, 2
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 2 * ff) + (ff * d + d) + 2 * d
    embeddings = v * d + 2 * d + 2 * d
    head = (d * d + d) + 2 * d + v
    n = embeddings + layers * per_layer + head
    with torch.device("meta"):
        assert sum(p.numel() for p in MosaicBertForMaskedLM(cfg).parameters()) == n
    assert paper_flops_per_token(n) == 6 * n
    # Exact matmul count: 2 sequences of 10 and 3 tokens, 4 masked tokens.
    matmul = 2 * (d * 3 * d + d * d + d * 2 * ff + ff * d)
    attention = 4 * (10**2 + 3**2) * d
    head_flops = 4 * 2 * (d * d + d * v)
    expected = 3 * (layers * (13 * matmul + attention) + head_flops)
    assert training_flops(cfg, [10, 3], 4) == expected
    assert mfu(1e12, 2, 1e12) == 0.5 and mfu(1e12, 1, None) is None
