"""Log intervals: where the host waits for the GPU, ranks agree, and the loop learns what to do next.

Every `log.interval` steps (and at the last step) `Intervals.close` reduces the interval's sums
and every rank's health and stop request in one all-reduce, logs the metrics (TensorBoard,
metrics.jsonl, the progress bar), checks divergence and loss spikes, advances the training clock
and returns an `IntervalResult`: why the run stops now (a signal or duration.wall_time on any
rank: every rank stops at the same step), whether training seconds crossed a timed eval or
checkpoint point, and whether duration.train_seconds is used up. Training seconds are the mean
of the ranks' clocks, so those decisions are the same on every rank.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..flops import mfu, paper_flops_per_token
from .checkpointer import TrainerState
from .health import BAD_STEPS, Health, check_divergence
from .metrics import MetricsLogger, console_line
from .reduce import all_reduce_named
from .run_config import RunConfig
from .schedule import fit_schedule_to_budget
from .step import Window
from .stops import SIGNAL, WALL_TIME, StopRequests


@dataclass
class IntervalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    stop: str | None = None
    """Why every rank stops at this step (None: go on)."""
    evaluate: bool = False
    """Training seconds crossed a multiple of eval.interval_seconds."""
    checkpoint: bool = False
    """Training seconds crossed a multiple of checkpoint.interval_seconds."""
    budget_reached: bool = False
    """duration.train_seconds is used up: this step is the last."""


NOTHING = IntervalResult()
"""The result between log intervals: nothing to do."""


def crossed(before: float, after: float, interval: float) -> bool:
    """Whether training seconds passed a multiple of `interval` between two log points."""
    return bool(interval) and math.floor(after / interval) > math.floor(before / interval)


class Intervals:
    def __init__(
        self,
        cfg: RunConfig,
        engine: Any,
        state: TrainerState,
        total_steps: int,
        world: int,
        n_params: int,
        peak: float | None,
        logger: MetricsLogger,
        health: Health,
        stops: StopRequests,
        deadline: float | None,
        last_good: Any,
        bar: Any = None,
    ) -> None:
        self.cfg, self.engine, self.state, self.world = cfg, engine, state, world
        self.total_steps = total_steps
        self.n_params, self.peak, self.logger, self.health, self.stops = n_params, peak, logger, health, stops
        self.deadline = deadline
        """time.monotonic() after which the run stops (duration.wall_time), or None."""
        self.last_good = last_good
        """A callable naming the last good checkpoint, for the divergence line."""
        self.bar = bar
        self.window = Window(engine.device)
        self.loss_mean: float | None = None  # running mean of interval losses, for the spike warning

    def due(self, step: int, last_step: bool) -> bool:
        if self.bar is not None:
            self.bar.update(1)
        return step % self.cfg.log.interval == 0 or last_step

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Eval and checkpoint time stay out of the throughput window."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window.pause(time.perf_counter() - start)

    def _local_stop(self) -> int:
        if self.stops.signal_name is not None:
            return SIGNAL
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return WALL_TIME
        return 0

    def close(self) -> IntervalResult:
        """Reduce, log and check the interval; RunStopped on divergence."""
        w, engine, state, world = self.window, self.engine, self.state, self.world
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        sums, rows = all_reduce_named(
            {
                "loss": w.loss,
                "correct": w.correct,
                "micro": w.micro,
                "steps": w.steps,
                "masked": w.masked,
                "tokens": w.tokens,
                "samples": w.samples,
                "flops": w.flops,
                "seconds": time.perf_counter() - w.start,
            },
            {"health": self.health.row(), "stop": torch.tensor([float(self._local_stop())])},
            engine.device,
        )
        seconds = sums["seconds"] / world  # the mean of the ranks' clocks
        steps = max(sums["steps"] / world, 1)
        masked, tokens = max(sums["masked"], 1), sums["tokens"]
        grad_norm = engine.get_global_grad_norm()
        metrics = {
            "loss/train": sums["loss"] / masked,  # mean over every masked token of the interval
            "accuracy/train": sums["correct"] / masked,
            "optim/lr": engine.get_lr()[0],
            "optim/grad_norm": float(grad_norm) if grad_norm is not None else None,
            "optim/nonfinite_steps": max(r[BAD_STEPS] for r in rows["health"]),
            "throughput/tokens_per_sec": tokens / seconds,
            "throughput/tokens_per_sec_per_gpu": tokens / seconds / world,
            "throughput/samples_per_sec": sums["samples"] / seconds,
            "throughput/samples_per_sec_per_gpu": sums["samples"] / seconds / world,
            "throughput/step_time_sec": seconds / steps,
            "throughput/mfu": mfu(paper_flops_per_token(self.n_params) * tokens / seconds, world, self.peak),
            "throughput/mfu_exact": mfu(sums["flops"] / seconds, world, self.peak),
        }
        if engine.device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result = IntervalResult(metrics=metrics)
        self._advance_clock(seconds, seconds / steps, sums, result)
        self.logger.log(state.step, metrics)
        if self.bar is not None:
            self.bar.set_postfix_str(console_line(metrics), refresh=False)
        self.health.reset_interval()
        self.window.reset()
        check_divergence(rows["health"], self.cfg.divergence.max_nonfinite_steps, state.step, self.last_good())
        self._warn_on_spike(metrics["loss/train"])
        reason = int(max(r[0] for r in rows["stop"]))
        if reason == SIGNAL:
            result.stop = self.stops.signal_name or "a signal on another rank"
        elif reason == WALL_TIME:
            result.stop = f"duration.wall_time {self.cfg.duration.wall_time} reached"
        return result

    def _advance_clock(
        self, seconds: float, step_seconds: float, sums: dict[str, float], result: IntervalResult
    ) -> None:
        """Training seconds (eval and checkpoint time excluded) drive timed eval and checkpoints and
        the duration.train_seconds budget, whose schedule is re-fitted here to end at the budget."""
        cfg, state = self.cfg, self.state
        state.samples += int(sums["samples"])
        state.tokens += int(sums["tokens"])
        before = state.train_seconds
        state.train_seconds += seconds
        result.evaluate = crossed(before, state.train_seconds, cfg.eval.interval_seconds)
        result.checkpoint = crossed(before, state.train_seconds, cfg.checkpoint.interval_seconds)
        budget = cfg.duration.train_seconds
        if budget and state.train_seconds >= budget:
            result.budget_reached = True
        elif budget and before > 0:  # the first interval holds start-up and compilation: not a step time
            fit_schedule_to_budget(
                self.engine.lr_scheduler.lr_lambdas[0],
                state.step,
                (budget - state.train_seconds) / step_seconds,
                self.total_steps,
                cfg.schedule.warmup_fraction,
            )
        result.metrics.update(
            {
                "progress/train_seconds": state.train_seconds,
                "progress/samples": state.samples,
                "progress/tokens": state.tokens,
                "progress/train_hours": state.train_seconds / 3600,
            }
        )

    def _warn_on_spike(self, loss: float) -> None:
        factor = self.cfg.divergence.spike_factor
        if not math.isfinite(loss):
            return
        if factor and self.loss_mean is not None and loss > factor * self.loss_mean and self.logger.enabled:
            print(
                f"mosaicbert-ds: warning: loss spike at step {self.state.step}: {loss:.4g} is "
                f"{loss / self.loss_mean:.1f}x the running mean {self.loss_mean:.4g}",
                file=sys.stderr,
                flush=True,
            )
        self.loss_mean = loss if self.loss_mean is None else 0.9 * self.loss_mean + 0.1 * loss

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
