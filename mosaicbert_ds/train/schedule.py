"""The paper's learning-rate schedule, for pretraining and finetuning alike: linear warmup, then
linear decay to a floor.

Warmup length: `warmup_fraction` of the run's steps, but at least `min_warmup_steps` (the floor,
schedule.min_warmup_steps in a run file; it counts for at most half of the run). A post-LayerNorm encoder
warmed up for a few dozen steps at a high rate can stay on the unigram plateau (docs/convergence.md);
a fraction of a short run (a time budget, a quickstart) gives exactly such a warmup, the floor
does not. The paper's 6% of 70,000 steps (4,200) is above any floor the recipes use.
"""

from __future__ import annotations

import torch


def warmup_length(total_steps: int, warmup_fraction: float, min_warmup_steps: int = 0) -> int:
    """Warmup steps of a run of `total_steps`: the fraction of it, raised to the floor; the floor
    counts for at most half the run (so a run shorter than twice the floor still decays)."""
    return max(round(total_steps * warmup_fraction), min(min_warmup_steps, total_steps // 2))


class WarmupLinearDecay:
    """Multiplier of the peak lr for optimizer step t (0-based), for torch's LambdaLR.

    Warmup rises linearly over `warmup_length(total_steps, warmup_fraction, min_warmup_steps)`
    steps, reaching the peak at the end of warmup; then the multiplier falls linearly to
    `final_ratio` at the last step (pretraining: the paper's floor of 0.02), or with
    `floor_after_last_step` one step after the last (finetuning: decay to 0 while every update
    still has a non-zero rate).
    """

    def __init__(
        self,
        total_steps: int,
        warmup_fraction: float,
        final_ratio: float,
        floor_after_last_step: bool = False,
        min_warmup_steps: int = 0,
    ) -> None:
        self.total_steps = total_steps
        self.min_warmup_steps = min_warmup_steps
        self.warmup_steps = warmup_length(total_steps, warmup_fraction, min_warmup_steps)
        self.final_ratio = final_ratio
        self.floor_offset = 0 if floor_after_last_step else 1
        self.budget_fitted = False  # warmup fixed once by fit_schedule_to_budget
        self.decay_start: int | None = None  # where a re-fitted decay starts (None: end of warmup)
        self.decay_start_value = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        start = self.warmup_steps if self.decay_start is None else self.decay_start
        value = 1.0 if self.decay_start is None else self.decay_start_value
        decay_steps = max(1, self.total_steps - self.floor_offset - start)
        progress = min(1.0, max(0.0, (step - start) / decay_steps))
        return value - (value - self.final_ratio) * progress


def fit_schedule_to_budget(
    schedule: WarmupLinearDecay, step: int, steps_left: float, max_steps: int, warmup_fraction: float
) -> None:
    """Fit a schedule to a wall-clock budget from the latest estimate of the steps it has left.

    The warmup length is set once, from the first estimate (after the start-up interval), with the
    schedule's floor (`min_warmup_steps`), so that the rate only rises during warmup. The end of
    the decay follows every later estimate; once the decay has begun it goes on linearly from the
    current rate to the floor at the new end, so the rate stays continuous and never rises again.
    The step cap `max_steps` still holds."""
    total = max(step + 1, min(max_steps, step + round(steps_left)))
    if not schedule.budget_fitted:
        schedule.warmup_steps = max(1, warmup_length(total, warmup_fraction, schedule.min_warmup_steps))
        schedule.budget_fitted = True
    if step >= schedule.warmup_steps:
        schedule.decay_start_value = schedule(step)
        schedule.decay_start = step
    schedule.total_steps = total


def make_scheduler(total_steps: int, warmup_fraction: float, final_ratio: float, min_warmup_steps: int = 0):
    """A callable DeepSpeed gives the optimizer to, returning a LambdaLR (checkpointed by DeepSpeed)."""

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupLinearDecay(total_steps, warmup_fraction, final_ratio, min_warmup_steps=min_warmup_steps)
        )

    return build


def retarget_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    total_steps: int,
    warmup_fraction: float,
    final_ratio: float,
    min_warmup_steps: int = 0,
    budget: bool = False,
) -> int:
    """Set a (resumed) scheduler's schedule to this run's duration; returns the total it had.

    A LambdaLR checkpoint restores its lambda's fields, so a resumed run would keep the old total
    (and sit at the floor past it). The learning rate of the current step is recomputed at once.
    With `budget` (duration.train_seconds), a schedule already fitted to the budget is kept as
    restored (warmup, decay start and estimated end; the next log interval re-fits the end), and
    `total_steps` is returned: the budget, not the step cap, sets the duration, so there is no
    change of duration to report."""
    fn = scheduler.lr_lambdas[0]
    old = fn.total_steps
    if budget and getattr(fn, "budget_fitted", False):
        return total_steps
    scheduler.lr_lambdas = [
        WarmupLinearDecay(total_steps, warmup_fraction, final_ratio, min_warmup_steps=min_warmup_steps)
        for _ in scheduler.lr_lambdas
    ]
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    return old
