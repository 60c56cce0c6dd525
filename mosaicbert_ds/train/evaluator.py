"""Held-out MLM loss and accuracy: when the loop evaluates, and the evaluation itself.

Besides the overall loss and accuracy, each evaluation reports them by position bucket
(train.position_loss: loss_by_position/0-127, 128-511, ...), so TensorBoard shows how the model
does far from a sequence's start.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .position_loss import PositionLoss
from .reduce import all_reduce_named
from .step import batch_stats, to_device


def micro_batches(loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's micro batches: with token budgets it yields lists of them."""
    for item in loader:
        if isinstance(item, list):
            yield from item
        else:
            yield item


@dataclass
class Evaluator:
    loader: Any
    """The held-out split's loader, or None when evaluation is off."""
    interval: int
    max_batches: int
    """Micro batches per rank per evaluation; 0: the whole split."""

    def due(self, step: int, last_step: bool, timed: bool) -> bool:
        """Every `interval` steps, at the last step, and when training seconds crossed a multiple
        of eval.interval_seconds (the interval result says so)."""
        if self.loader is None:
            return False
        return bool(last_step or timed or (self.interval and step % self.interval == 0))

    @torch.no_grad()
    def evaluate(self, engine: Any) -> dict[str, float]:
        """MLM loss (per masked token) and accuracy on the held-out split, summed over ranks,
        overall and by position bucket."""
        engine.eval()
        loss = torch.zeros((), device=engine.device, dtype=torch.float64)
        correct = torch.zeros((), device=engine.device, dtype=torch.float64)
        by_position = PositionLoss(engine.device)
        masked = 0
        for i, batch in enumerate(micro_batches(self.loader)):
            if self.max_batches and i >= self.max_batches:
                break
            n_masked = batch_stats(batch)[2]
            batch = to_device(batch, engine.device)
            out = engine(**batch)
            loss += out.loss.double() * n_masked
            correct += (out.logits.argmax(-1) == out.masked_labels).sum().double()
            by_position.add(out, batch)
            masked += n_masked
        engine.train()
        sums, _ = all_reduce_named(
            {"loss": loss, "correct": correct, **by_position.scalars(), "masked": masked}, device=engine.device
        )
        n = max(sums["masked"], 1)
        return {"loss/eval": sums["loss"] / n, "accuracy/eval": sums["correct"] / n, **by_position.metrics(sums)}
