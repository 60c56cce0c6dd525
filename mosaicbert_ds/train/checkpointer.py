"""When a run saves, and what a save guarantees (the files themselves: train.checkpoint).

`Checkpointer.save_due(step, ...)` is the loop's one question about saving; `save()` writes a
complete checkpoint of this step on every rank, or stops the run:
- never a checkpoint of non-finite weights, nor one taken after a non-finite step: a save point
  is skipped (one warning line) unless every step since the previous save point was finite, so
  the checkpoint a divergence stop names as the last good one is good (exit 3);
- never a half-written one taken for finished: a failed write removes its partial tag and stops
  with exit 5, the previous checkpoint intact.
The trainer state saved beside DeepSpeed's files records what an exact resume needs and what
the checkpoint belongs to (the dataset's identity, the precision path, the global batch).
"""

from __future__ import annotations

import errno
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .health import BAD_SINCE_SAVE, Health, weights_finite
from .reduce import all_reduce_named
from .stops import ExitCode, RunStopped


@dataclass
class TrainerState:
    step: int = 0
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    """Wall-clock seconds spent training (not evaluating or checkpointing): the Pareto x-axis."""
    world_size: int = 1
    global_batch: int = 0
    """Sequences per optimizer step (0 in checkpoints that did not record it)."""
    precision: str = ""
    """DeepSpeed's optimizer path ("BF16_Optimizer", "DeepSpeedZeroOptimizer", ...); "" if not recorded."""
    dataset: dict = field(default_factory=dict)
    """The training data's identity (train.dataset_identity); empty if not recorded."""
    train_loader: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Checkpointer:
    root: Path
    interval: int
    interval_seconds: float
    keep_last: int
    rank: int
    world: int
    last_saved: str | None = None
    """The newest complete tag (this run's or the one it resumed from)."""

    def save_due(self, step: int, last_step: bool, stopping: bool, timed: bool) -> bool:
        """Every `interval` steps, at the last step, when the run stops early, and when training
        seconds crossed a multiple of `interval_seconds` (the interval result says so)."""
        return bool((self.interval and step % self.interval == 0) or last_step or stopping or timed)

    def last_good(self) -> str:
        return str(self.root / self.last_saved) if self.last_saved else "none"

    def save(self, engine: Any, state: TrainerState, loader: Any, health: Health, max_nonfinite: int) -> bool:
        """Save a complete checkpoint of `state.step` on every rank; False when the save point is
        skipped after non-finite steps. RunStopped on non-finite weights (exit 3) or a failed write (5)."""
        from .health import check_divergence

        tag = f"step_{state.step:07d}"
        if tag == self.last_saved:
            return True
        sums, rows = all_reduce_named(
            {"bad_weights": 1 - weights_finite(engine.module).double()}, {"health": health.row()}
        )
        check_divergence(rows["health"], max_nonfinite, state.step, self.last_good(), sums["bad_weights"] == 0)
        bad = int(max(r[BAD_SINCE_SAVE] for r in rows["health"]))
        health.reset_save_point()
        if bad:
            if self.rank == 0:
                print(
                    f"mosaicbert-ds: warning: no checkpoint at step {state.step}: {bad} non-finite step(s) "
                    f"since the previous save point; the last good checkpoint stays {self.last_good()}",
                    file=sys.stderr,
                    flush=True,
                )
            return False
        state.train_loader = loader.state_dict()
        try:
            ckpt.save(engine, self.root, tag, vars(state), self.rank)
        except (OSError, RuntimeError, shutil.Error) as err:
            if self.rank == 0:
                ckpt.remove_incomplete(self.root, tag)
            good = f"{self.last_good()} is intact" if self.last_saved else "no earlier checkpoint"
            raise RunStopped(
                ExitCode.SAVE_FAILED,
                f"could not save checkpoint {tag} at step {state.step}: {describe_os_error(err, self.root)}; {good}",
                {"step": state.step},
            ) from None
        self.last_saved = tag
        if self.rank == 0:
            ckpt.prune(self.root, self.keep_last)
        return True


def describe_os_error(err: BaseException, where: Path) -> str:
    """One phrase for a failed write. torch.save reports a full disk as a RuntimeError without an
    errno, and shutil.copytree as a shutil.Error listing each file, so little free space left after
    the failure counts as a full disk too."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        free = None
    if getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < 64 * 2**20):
        return "no space left on device" + (f" ({free / 2**20:.0f} MiB free under {where})" if free is not None else "")
    return text[:200]
