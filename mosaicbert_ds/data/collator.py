"""MLM masking and batching: token-id samples -> the batch MosaicBertForMaskedLM consumes.

The batch is a mosaicbert_ds.batch.PackedBatch (default) or, with padded=True (the BERT baseline
and the unpadding ablation), a PaddedBatch whose width L is the batch maximum, or `pad_to` if
given; mosaicbert_ds/batch.py documents the fields and shapes.

Masking follows BERT: each non-special token is chosen with probability `mlm_probability`
(0.30 for MosaicBERT, 0.15 for BERT and for evaluation); a chosen token becomes [MASK] 80% of
the time, a random real-vocabulary token 10%, and stays itself 10%. [CLS], [SEP], [PAD] (every
special token) are never chosen. Every random number is a hash of (seed, epoch, sample index,
position) (see hashing.py), so the masks do not depend on world size, worker count or which
other samples share the batch: a resumed run sees exactly the masks of an uninterrupted one,
and each epoch re-masks (dynamic masking, as in RoBERTa; `remask_each_epoch=False` keeps one
mask per sample, which the evaluation loader uses so that every evaluation scores the same
masked tokens). If a whole batch would have no chosen
token although it has maskable ones, one token of its first maskable sample is chosen (the one
with the smallest hash), so the MLM loss is never NaN; only then does a batch's make-up matter.

Packed rows (`convert --pack`) carry `doc_lengths`, the lengths of the sequences in the row. In
the packed layout each sequence gets its own cu_seqlens entry (attention and positions restart
in every sequence) and the batch records its stored samples in "samples"; in the padded layout
each sequence becomes a row of its own. Masking is per stored sample, as for unpacked data.

`TokenBudgetCollator` splits the samples of one optimizer step (a rank's share) into micro
batches of whole samples of at most `micro_tokens` tokens each, as few as fit and as even as
possible, in sample order (`split_by_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..batch import IGNORE_INDEX, MLMBatch, PackedBatch, PaddedBatch
from .hashing import combine, to_unit


class MLMCollator:
    """Mask and batch samples of {"input_ids": np.ndarray, "index": int, "epoch": int}.

    `replacement_ids` are the ids a chosen token may be swapped for (the 10% random case);
    `pad_to` fixes the padded width (padded=True only).
    """

    def __init__(
        self,
        *,
        mask_token_id: int,
        pad_token_id: int,
        special_token_ids: Sequence[int],
        replacement_ids: np.ndarray,
        mlm_probability: float = 0.30,
        seed: int = 0,
        padded: bool = False,
        pad_to: int | None = None,
        remask_each_epoch: bool = True,
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if len(replacement_ids) == 0:
            raise ValueError("replacement_ids is empty")
        if seed < 0:
            raise ValueError(f"seed must be 0 or more, got {seed}")
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = int(pad_token_id)
        self.special_token_ids = np.asarray(sorted(set(special_token_ids)), dtype=np.int64)
        self.replacement_ids = np.asarray(replacement_ids, dtype=np.int64)
        self.mlm_probability = float(mlm_probability)
        self.seed = int(seed)
        self.padded = padded
        self.pad_to = pad_to
        self.remask_each_epoch = remask_each_epoch

    @classmethod
    def from_dataset_info(cls, info: dict[str, Any], **kwargs: Any) -> MLMCollator:
        """A collator for a converted dataset: special ids and replacement vocabulary from its index."""
        tok = info["tokenizer"]
        excluded = np.asarray(tok["non_replacement_ids"], dtype=np.int64)
        replacement = np.setdiff1d(np.arange(tok["vocab_size"], dtype=np.int64), excluded)
        return cls(
            mask_token_id=tok["mask_token_id"],
            pad_token_id=tok["pad_token_id"],
            special_token_ids=tok["special_token_ids"],
            replacement_ids=replacement,
            **kwargs,
        )

    # ---- masking ------------------------------------------------------------------------
    def maskable(self, ids: np.ndarray) -> np.ndarray:
        return ~np.isin(ids, self.special_token_ids)

    def mask(self, samples: Sequence[dict[str, Any]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(inputs, labels) per sample; each depends only on (seed, epoch, index, its ids)."""
        ids = [np.asarray(s["input_ids"], dtype=np.int64) for s in samples]
        lengths = np.array([len(x) for x in ids])
        flat = np.concatenate(ids)
        sample_of = np.repeat(np.arange(len(samples)), lengths)
        positions = np.arange(len(flat)) - (np.cumsum(lengths) - lengths)[sample_of]
        epochs = np.array([s.get("epoch", 0) if self.remask_each_epoch else 0 for s in samples], dtype=np.uint64)
        indices = np.array([s["index"] for s in samples], dtype=np.uint64)
        key = combine(combine(np.full(len(samples), self.seed, np.uint64), epochs), indices)[sample_of]
        # one independent hash per (token, stream): 0 choose, 1 action, 2 replacement, 3 fallback
        draw = lambda stream: combine(key, positions.astype(np.uint64) * np.uint64(8) + np.uint64(stream))  # noqa: E731

        maskable = self.maskable(flat)
        chosen = (to_unit(draw(0)) < self.mlm_probability) & maskable
        if not chosen.any() and maskable.any():
            candidates = np.flatnonzero(maskable & (sample_of == sample_of[np.argmax(maskable)]))
            chosen[candidates[np.argmin(draw(3)[candidates])]] = True
        action = to_unit(draw(1))
        replacement = (to_unit(draw(2)) * len(self.replacement_ids)).astype(np.int64)

        inputs = flat.copy()
        inputs[chosen & (action < 0.8)] = self.mask_token_id
        rand = chosen & (action >= 0.8) & (action < 0.9)
        inputs[rand] = self.replacement_ids[replacement[rand]]
        labels = np.where(chosen, flat, IGNORE_INDEX)
        cuts = np.cumsum(lengths)[:-1]
        return np.split(inputs, cuts), np.split(labels, cuts)

    # ---- batching -----------------------------------------------------------------------
    def __call__(self, samples: list[dict[str, Any]]) -> MLMBatch:
        if not samples:
            raise ValueError("empty batch")
        inputs, labels = self.mask(samples)
        masked = list(zip(inputs, labels))
        rows = [s.get("doc_lengths") for s in samples]
        if all(r is None for r in rows):
            return self._padded(masked) if self.padded else self._unpadded(masked)
        lengths = [np.asarray([len(inp)] if r is None else r, dtype=np.int64) for (inp, _), r in zip(masked, rows)]
        for (inp, _), lens in zip(masked, lengths):
            if int(lens.sum()) != len(inp):
                raise ValueError(f"a packed row of {len(inp)} tokens has sequences summing to {int(lens.sum())}")
        if self.padded:  # one padded row per sequence: attention and positions stay within it
            cuts = [np.cumsum(lens)[:-1] for lens in lengths]
            sequences = [
                pair for (inp, lab), c in zip(masked, cuts) for pair in zip(np.split(inp, c), np.split(lab, c))
            ]
            return {**self._padded(sequences), "samples": len(samples)}
        return {**self._unpadded(masked, np.concatenate(lengths)), "samples": len(samples)}

    def _unpadded(self, masked: list[tuple[np.ndarray, np.ndarray]], lengths: np.ndarray | None = None) -> PackedBatch:
        if lengths is None:
            lengths = np.array([len(inputs) for inputs, _ in masked], dtype=np.int64)
        labels = torch.from_numpy(np.concatenate([lab for _, lab in masked]))
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.from_numpy(np.cumsum(lengths)).to(torch.int32)
        return {
            "input_ids": torch.from_numpy(np.concatenate([inp for inp, _ in masked])),
            "cu_seqlens": cu_seqlens,
            "max_seqlen": int(lengths.max()),
            "labels": labels,
            "masked_positions": torch.nonzero(labels != IGNORE_INDEX).flatten(),
        }

    def _padded(self, masked: list[tuple[np.ndarray, np.ndarray]]) -> PaddedBatch:
        longest = max(len(inputs) for inputs, _ in masked)
        width = longest if self.pad_to is None else self.pad_to
        if width < longest:
            raise ValueError(f"pad_to={self.pad_to} is shorter than a sample of {longest} tokens")
        input_ids = torch.full((len(masked), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(masked), width), dtype=torch.long)
        labels = torch.full((len(masked), width), IGNORE_INDEX, dtype=torch.long)
        for row, (inputs, lab) in enumerate(masked):
            input_ids[row, : len(inputs)] = torch.from_numpy(inputs)
            attention_mask[row, : len(inputs)] = 1
            labels[row, : len(inputs)] = torch.from_numpy(lab)
        # flat (B * width) indices of the masked tokens: the model needs no nonzero() on the device
        masked_positions = torch.nonzero(labels.flatten() != IGNORE_INDEX).flatten()
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "masked_positions": masked_positions,
        }


def split_by_tokens(lengths: Sequence[int], budget: int) -> list[int]:
    """Cut points of whole samples, in order, into micro batches of at most `budget` tokens.

    Returns the end index of each micro batch. The count is the fewest that fit (greedy
    next-fit); among splits into that many contiguous groups, the one with the smallest largest
    group (the tightest cap for which next-fit still needs no more groups). A sample longer than
    `budget` is a micro batch of its own."""
    if not len(lengths):
        return []

    def ends(cap: int) -> list[int]:
        out, used = [], 0
        for i, n in enumerate(lengths):
            if used and used + n > cap:
                out.append(i)
                used = 0
            used += n
        return [*out, len(lengths)]

    count = len(ends(budget))
    lo, hi = max(max(lengths), -(-sum(lengths) // count)), max(budget, max(lengths))
    while lo < hi:  # the smallest cap that still gives `count` micro batches
        mid = (lo + hi) // 2
        if len(ends(mid)) <= count:
            hi = mid
        else:
            lo = mid + 1
    return ends(lo)


class TokenBudgetCollator:
    """Samples of one optimizer step -> a list of masked micro batches of at most `micro_tokens`
    tokens each (split_by_tokens). Masks do not depend on the split (MLMCollator)."""

    def __init__(self, collator: MLMCollator, micro_tokens: int) -> None:
        if micro_tokens < 1:
            raise ValueError(f"micro_tokens must be positive, got {micro_tokens}")
        self.collator, self.micro_tokens = collator, micro_tokens

    def __call__(self, samples: list[dict[str, Any]]) -> list[MLMBatch]:
        if not samples:
            raise ValueError("empty batch")
        ends = split_by_tokens([len(s["input_ids"]) for s in samples], self.micro_tokens)
        return [self.collator(samples[a:b]) for a, b in zip([0, *ends[:-1]], ends)]
