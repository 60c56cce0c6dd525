"""MLM loss and accuracy by position bucket: how a model does at each distance from its sequence start.

A masked token's position is its index within its own sequence (a stored sample, or one sequence
of a packed row), which is what ALiBi and learned positions see. The buckets are [0, 128),
[128, 512), [512, 1024), then powers of two: the first is the paper's training length, so the
later ones show how a 128-trained ALiBi model extrapolates. Sums stay on the device; the
evaluator all-reduces them with its own and reports the buckets that saw masked tokens:

    loss_by_position/0-127, loss_by_position/128-511, ..., accuracy_by_position/0-127, ...
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..batch import MLMBatch, is_packed
from ..padding import positions_from_cu_seqlens

EDGES = (0, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
"""Bucket starts; the last bucket is open-ended."""


def bucket_names(edges: tuple[int, ...] = EDGES) -> list[str]:
    return [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]


def masked_positions_in_sequence(batch: MLMBatch) -> torch.Tensor:
    """Each masked token's position within its own sequence (same device as the batch)."""
    positions = batch["masked_positions"]
    if is_packed(batch):
        return positions_from_cu_seqlens(batch["cu_seqlens"], batch["input_ids"].numel())[positions]
    return positions % batch["input_ids"].shape[1]


class PositionLoss:
    """Per-bucket sums of the masked-token loss, correct predictions and counts, on the device."""

    def __init__(self, device: torch.device, edges: tuple[int, ...] = EDGES) -> None:
        self.edges = torch.tensor(edges, device=device)
        self.names = bucket_names(edges)
        self.loss = torch.zeros(len(edges), device=device, dtype=torch.float64)
        self.correct = torch.zeros_like(self.loss)
        self.count = torch.zeros_like(self.loss)

    def add(self, out: Any, batch: MLMBatch, chunk: int = 8192) -> None:
        """Add one micro batch: `out` is MosaicBertForMaskedLM's output with labels (logits and
        masked_labels of the masked tokens only), `batch` the batch on the same device. The
        per-token loss is taken `chunk` rows at a time (fp32 logits of every row at once would
        be M x V x 4 bytes)."""
        positions = masked_positions_in_sequence(batch)
        bucket = torch.bucketize(positions, self.edges, right=True) - 1
        for start in range(0, positions.numel(), chunk):
            logits = out.logits[start : start + chunk].float()
            labels = out.masked_labels[start : start + chunk]
            b = bucket[start : start + chunk]
            loss = F.cross_entropy(logits, labels, reduction="none").double()
            self.loss.index_add_(0, b, loss)
            self.correct.index_add_(0, b, (logits.argmax(-1) == labels).double())
            self.count.index_add_(0, b, torch.ones_like(loss))

    def scalars(self) -> dict[str, torch.Tensor]:
        """Named device scalars for train.reduce.all_reduce_named."""
        out = {}
        for i, name in enumerate(self.names):
            out[f"pos_loss:{name}"] = self.loss[i]
            out[f"pos_correct:{name}"] = self.correct[i]
            out[f"pos_count:{name}"] = self.count[i]
        return out

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The buckets with masked tokens, from the (reduced) scalars: loss and accuracy."""
        out = {}
        for name in self.names:
            n = sums[f"pos_count:{name}"]
            if n:
                out[f"loss_by_position/{name}"] = sums[f"pos_loss:{name}"] / n
                out[f"accuracy_by_position/{name}"] = sums[f"pos_correct:{name}"] / n
        return out

    def counts(self, sums: dict[str, float]) -> dict[str, int]:
        return {name: int(sums[f"pos_count:{name}"]) for name in self.names if sums[f"pos_count:{name}"]}
