"""One warning when a pretraining run sits on the unigram plateau.

On the plateau the model predicts token frequencies and ignores its input: the held-out loss
stays at the dataset's unigram level (`unigram_val_loss`, stored in the dataset index by
`convert`; see data.unigram). A post-LayerNorm encoder gets stuck there when its warmup is too
short for its peak learning rate (docs/convergence.md). `PlateauWatch.observe` is called after
every evaluation. Once warmup has ended and `eval.plateau_steps` more steps have passed, an
evaluation still within `eval.plateau_margin` nats of the unigram level prints one line naming
the settings to change, at most once per run (and never after the loss was once clearly below the
level). It never stops the run: a slow start is not a failure, and the user decides.
"""

from __future__ import annotations

import math
import sys
from typing import Any, TextIO

METRIC = "loss/unigram_baseline"
"""The unigram level, logged beside loss/eval (TensorBoard, metrics.jsonl) when the dataset has it."""


class PlateauWatch:
    """Warns once when the held-out loss is still within `margin` nats of `level` at or after
    `warmup_steps() + after_steps` steps.

    `level`: the held-out split's unigram level (None: not stored with the dataset; the watch then
    neither logs nor warns). `after_steps` 0 turns the warning off. `warmup_steps` and `peak_lr`
    are read when the warning is due (a time-budget schedule fixes its warmup after the start)."""

    def __init__(
        self,
        level: float | None,
        margin: float,
        after_steps: int,
        warmup_steps: Any = lambda: 0,
        peak_lr: Any = lambda: None,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.level = level
        self.margin = margin
        self.after_steps = after_steps
        self.warmup_steps = warmup_steps
        self.peak_lr = peak_lr
        self.enabled = enabled and level is not None and after_steps > 0
        self.stream = stream
        self.left = False  # the loss was clearly below the level once: the run learns
        self.warned = False

    @classmethod
    def for_run(cls, cfg: Any, info: dict[str, Any], scheduler: Any, rank: int) -> PlateauWatch:
        """The watch of a pretraining run: its config, its dataset's index, its LambdaLR."""
        level = info.get("unigram_val_loss") if cfg.data.eval_split == "val" else None
        return cls(
            level,
            cfg.eval.plateau_margin,
            cfg.eval.plateau_steps,
            warmup_steps=lambda: scheduler.lr_lambdas[0].warmup_steps,
            peak_lr=lambda: scheduler.base_lrs[0],
            enabled=rank == 0,
        )

    def message(self, step: int, loss: float) -> str:
        lr = self.peak_lr()
        now = f"warmup {self.warmup_steps()} steps" + (f", peak lr {lr:.3g}" if lr is not None else "")
        return (
            f"mosaicbert-ds: warning: the held-out loss has not gone below the unigram level after {step} steps "
            f"({loss:.3f}; token frequencies alone give {self.level:.3f}): the model ignores its input. "
            f"Likely causes: too short a warmup for the peak learning rate, or too high a rate ({now}); "
            "raise schedule.min_warmup_steps or lower optimizer.lr (docs/convergence.md)."
        )

    def check(self, step: int, loss: float) -> bool:
        """After an evaluation at `step`: True when this call warned (printed its one line)."""
        if not self.enabled or self.warned or self.left or not math.isfinite(loss):
            return False
        if loss < self.level - self.margin:
            self.left = True
            return False
        if step < self.warmup_steps() + self.after_steps:
            return False
        self.warned = True
        print(self.message(step, loss), file=self.stream or sys.stderr, flush=True)
        return True

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """Add the unigram level to an evaluation's metrics (to be logged) and check its loss."""
        if self.level is None:
            return
        metrics[METRIC] = self.level
        self.check(step, metrics["loss/eval"])
