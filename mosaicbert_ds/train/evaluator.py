"""Held-out MLM loss and accuracy: when the loop evaluates, and the evaluation itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .reduce import all_reduce_named
from .step import batch_stats, to_device


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
        """MLM loss (per masked token) and accuracy on the held-out split, summed over ranks."""
        engine.eval()
        loss = torch.zeros((), device=engine.device, dtype=torch.float64)
        correct = torch.zeros((), device=engine.device, dtype=torch.float64)
        masked = 0
        for i, batch in enumerate(self.loader):
            if self.max_batches and i >= self.max_batches:
                break
            n_masked = batch_stats(batch)[2]
            out = engine(**to_device(batch, engine.device))
            loss += out.loss.double() * n_masked
            correct += (out.logits.argmax(-1) == out.masked_labels).sum().double()
            masked += n_masked
        engine.train()
        sums, _ = all_reduce_named({"loss": loss, "correct": correct, "masked": masked}, device=engine.device)
        n = max(sums["masked"], 1)
        return {"loss/eval": sums["loss"] / n, "accuracy/eval": sums["correct"] / n}
