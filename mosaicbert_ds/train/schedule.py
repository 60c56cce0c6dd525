"""The paper's learning-rate schedule, for pretraining and finetuning alike: linear warmup, then
linear decay to a floor."""

from __future__ import annotations

import torch


class WarmupLinearDecay:
    """Multiplier of the peak lr for optimizer step t (0-based), for torch's LambdaLR.

    Warmup rises linearly over the first `warmup_fraction` of the steps, reaching the peak at the
    end of warmup; then the multiplier falls linearly to `final_ratio` at the last step
    (pretraining: the paper's floor of 0.02), or with `floor_after_last_step` one step after the
    last (finetuning: decay to 0 while every update still has a non-zero rate).
    """

    def __init__(self, total_steps: int, warmup_fraction: float, final_ratio: float,
                 floor_after_last_step: bool = False) -> None:
        self.total_steps = total_steps
        self.warmup_steps = round(total_steps * warmup_fraction)
        self.final_ratio = final_ratio
        self.floor_step = total_steps if floor_after_last_step else total_steps - 1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.floor_step - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 1.0 - (1.0 - self.final_ratio) * progress


def make_scheduler(total_steps: int, warmup_fraction: float, final_ratio: float):
    """A callable DeepSpeed gives the optimizer to, returning a LambdaLR (checkpointed by DeepSpeed)."""

    def build(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(total_steps, warmup_fraction, final_ratio))

    return build


def retarget_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int, warmup_fraction: float,
                      final_ratio: float) -> int:
    """Set a (resumed) scheduler's schedule to this run's duration; returns the total it had.

    A LambdaLR checkpoint restores its lambda's fields, so a resumed run would keep the old total
    (and sit at the floor past it). The learning rate of the current step is recomputed at once."""
    fn = scheduler.lr_lambdas[0]
    old = fn.total_steps
    scheduler.lr_lambdas = [WarmupLinearDecay(total_steps, warmup_fraction, final_ratio)
                            for _ in scheduler.lr_lambdas]
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
    return old
