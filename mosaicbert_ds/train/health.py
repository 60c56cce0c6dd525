"""Divergence detection with counters that stay on the device.

Each optimizer step is *non-finite* on a rank when its summed micro-batch loss or the global
gradient norm is NaN/inf. Then DeepSpeed's ZeRO optimizer (fp32) or torch's fused AdamW
(train.deepspeed_internals, through found_inf) skips the step; on other paths the weights may be damaged,
which the check before every save catches. The counters below are updated with a few tiny
device ops per step and read only at log intervals and saves, in the interval's one collective.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .stops import ExitCode, RunStopped

# per-rank slots, gathered by summing a [world, SLOTS] tensor with this rank's row filled in
BAD_STEPS, MAX_STREAK, STREAK, STREAK_START, LOSS_START, BAD_SINCE_SAVE = range(6)
SLOTS = 6


class Health:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        z = lambda: torch.zeros((), device=device, dtype=torch.float64)  # noqa: E731
        self.streak, self.streak_start, self.loss_start = z(), z(), z()
        self.bad_steps, self.max_streak, self.bad_since_save = z(), z(), z()

    def reset_interval(self) -> None:
        self.bad_steps.zero_()
        self.max_streak.copy_(self.streak)

    def reset_save_point(self) -> None:
        self.bad_since_save.zero_()

    def update(self, step: int, step_loss: torch.Tensor, grad_norm: Any) -> None:
        """After optimizer step `step` (1-based): no host sync."""
        loss_bad = ~torch.isfinite(step_loss)
        if grad_norm is None:
            bad = loss_bad
        elif torch.is_tensor(grad_norm):
            bad = loss_bad | ~torch.isfinite(grad_norm.to(self.device))
        else:
            bad = loss_bad | torch.tensor(not math.isfinite(float(grad_norm)), device=self.device)
        bad, loss_bad = bad.double(), loss_bad.double()
        starts = bad * (self.streak == 0)
        self.streak_start.copy_(self.streak_start * bad * (1 - starts) + starts * step)
        new_loss = loss_bad * (self.loss_start == 0)
        self.loss_start.copy_(self.loss_start * bad * (1 - new_loss) + new_loss * step)
        self.streak.copy_((self.streak + 1) * bad)
        self.bad_steps += bad
        self.bad_since_save += bad
        torch.maximum(self.max_streak, self.streak, out=self.max_streak)

    def row(self) -> torch.Tensor:
        return torch.stack(
            [self.bad_steps, self.max_streak, self.streak, self.streak_start, self.loss_start, self.bad_since_save]
        )


def weights_finite(module: torch.nn.Module) -> torch.Tensor:
    """A device bool: every parameter of `module` is finite (per tensor: a norm would overflow on
    large finite weights). Called at saves only."""
    return torch.stack([torch.isfinite(p.detach()).all() for p in module.parameters()]).all()


def describe_divergence(rows: list[list[float]], limit: int) -> tuple[int, str]:
    """(first non-finite step, 'rank(s) ...') from the gathered per-rank rows."""
    starts = [r[STREAK_START] for r in rows if r[STREAK] > 0 or r[MAX_STREAK] >= limit]
    step = int(min(starts)) if starts else 0
    loss_starts = [(int(r[LOSS_START]), rank) for rank, r in enumerate(rows) if r[LOSS_START] > 0]
    if loss_starts:
        first = min(s for s, _ in loss_starts)
        ranks = [rank for s, rank in loss_starts if s == first]
        return step, f"non-finite loss first on rank(s) {', '.join(map(str, ranks))} at step {first}"
    return step, "finite losses on every rank, non-finite gradient norm"


def check_divergence(rows: list[list[float]], limit: int, step: int, last_good: str, weights_ok: bool = True) -> None:
    """Stop the run (exit 3) after `limit` consecutive non-finite steps on any rank, or on
    non-finite weights; `rows` are every rank's Health.row()."""
    if max(r[MAX_STREAK] for r in rows) < limit and weights_ok:
        return
    first, where = describe_divergence(rows, limit)
    what = f"{limit} consecutive non-finite steps from step {first}"
    if not weights_ok:
        what = f"non-finite weights at step {step}"
    raise RunStopped(
        ExitCode.DIVERGED,
        f"diverged at step {step}: {what} ({where}); no checkpoint written; last good checkpoint: {last_good}",
        {"step": step},
    )
