"""The MLM batch that the collator builds, the CUDA-graph step pads, the trainer moves to the
device and MosaicBertForMaskedLM consumes. Its fields and shapes are documented here only.

Both layouts are plain dicts at run time (TypedDicts), so `model(**batch)` and DeepSpeed's
`engine(**batch)` take them unchanged.

B sequences, T real tokens in all, M masked (chosen) tokens, L the padded width:

    PackedBatch (the default: every real token, no padding)
        input_ids         int64 (T,)    every sequence's tokens, concatenated, after masking
        cu_seqlens        int32 (B+1,)  sequence boundaries in the flat stream, cu_seqlens[0] = 0
        max_seqlen        int           longest sequence of this batch
        labels            int64 (T,)    the original id where a token was chosen, IGNORE_INDEX elsewhere
        masked_positions  int64 (M,)    sorted indices into input_ids where labels != IGNORE_INDEX
        token_type_ids    int64 (T,)    optional
        samples           int           optional: stored samples, when packed rows (convert --pack)
                                        hold several sequences each (what the data position counts)

    PaddedBatch (padded=True: the BERT baseline and the unpadding ablation)
        input_ids         int64 (B, L)
        attention_mask    int64 (B, L)  1 on real tokens, 0 on padding
        labels            int64 (B, L)  IGNORE_INDEX at unchosen and pad slots
        masked_positions  int64 (M,)    indices into the flattened (B * L) batch where labels != IGNORE_INDEX
        samples           int           optional, as above (each sequence of a packed row is a row here)

`masked_positions` lets the model gather the masked rows without a `nonzero` (a host sync) on
the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict

import torch
from typing_extensions import NotRequired

IGNORE_INDEX = -100
"""The label of a token that carries no loss (torch's cross_entropy default)."""


class PackedBatch(TypedDict):
    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    labels: torch.Tensor
    masked_positions: torch.Tensor
    token_type_ids: NotRequired[torch.Tensor]
    samples: NotRequired[int]


class PaddedBatch(TypedDict):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    masked_positions: torch.Tensor
    samples: NotRequired[int]


MLMBatch = PackedBatch | PaddedBatch
"""Either layout; a PackedBatch is the one with "cu_seqlens"."""


def is_packed(batch: MLMBatch) -> bool:
    return "cu_seqlens" in batch


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on `device` (copied without waiting); other values as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
