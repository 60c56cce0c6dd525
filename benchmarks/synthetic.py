"""Synthetic MLM batches with a C4-like length mix, in the packed and padded layouts.

The length mix stands in for C4 truncated at 128 tokens: a fraction of rows is full and the rest
have uniform lengths (the issue's benchmark regimes). Token ids are random non-special ids;
masking follows the collator's rule (mask rate, special tokens never masked). Nothing here is
all zeros, so timings are not flattered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mosaicbert_ds.batch import to_device  # noqa: F401  (re-exported for the benchmarks)
from mosaicbert_ds.padding import cu_seqlens_from_lengths


@dataclass(frozen=True)
class LengthMix:
    max_len: int
    full_fraction: float
    min_len: int
    max_partial: int

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        full = torch.rand(n, generator=g) < self.full_fraction
        partial = torch.randint(self.min_len, self.max_partial + 1, (n,), generator=g)
        return torch.where(full, torch.full_like(partial, self.max_len), partial)


# Pretraining: C4 at 128 tokens, 75% of rows full, the rest 8..127 (about 88% real tokens).
PRETRAIN = LengthMix(max_len=128, full_fraction=0.75, min_len=8, max_partial=127)
# Finetuning-like: max length 256, mean about 64 real tokens.
FINETUNE = LengthMix(max_len=256, full_fraction=0.0, min_len=8, max_partial=120)


def make_batch(
    mix: LengthMix, batch: int, vocab: int, mask_rate: float = 0.3, seed: int = 0, n_special: int = 5
) -> dict[str, dict[str, torch.Tensor | int]]:
    """One batch in both layouts: {"packed": {...}, "padded": {...}} on the CPU."""
    g = torch.Generator().manual_seed(seed)
    lens = mix.sample(batch, g)
    total = int(lens.sum())
    ids = torch.randint(n_special, vocab, (total,), generator=g)
    masked = torch.rand(total, generator=g) < mask_rate
    masked[0] = True  # never an empty loss
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    inputs = torch.where(masked, torch.full_like(ids, 4), ids)  # 4 plays [MASK]
    cu = cu_seqlens_from_lengths(lens)
    packed = {
        "input_ids": inputs,
        "cu_seqlens": cu,
        "max_seqlen": int(lens.max()),
        "labels": labels,
        "masked_positions": masked.nonzero().flatten(),
    }
    width = int(lens.max())
    mask = (torch.arange(width)[None, :] < lens[:, None]).long()
    pad_ids = torch.zeros(batch, width, dtype=torch.long)
    pad_labels = torch.full((batch, width), -100, dtype=torch.long)
    pad_ids[mask.bool()] = inputs
    pad_labels[mask.bool()] = labels
    padded = {"input_ids": pad_ids, "attention_mask": mask, "labels": pad_labels}
    return {"packed": packed, "padded": padded, "tokens": total, "masked": int(masked.sum()), "lengths": lens.tolist()}
