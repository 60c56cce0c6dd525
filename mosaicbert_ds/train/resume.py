"""Resuming a run: the checkpoint's trainer state checked against this run before the engine is
built (`read_resume_state`), then weights, optimizer, schedule, data position and RNG restored
into the built engine and loader (`restore`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import checkpoint as ckpt
from .checkpointer import TrainerState
from .ds_config import precision_path
from .run_config import RunConfig
from .schedule import retarget_schedule


def read_resume_state(
    cfg: RunConfig,
    ds_config: dict[str, Any],
    dataset: dict[str, Any],
    resume: tuple[Path, str] | None,
    world: int,
    rank: int,
) -> TrainerState:
    """The trainer state to start from, checked against this run before the engine is built: the
    precision path, the dataset (`dataset`: data.info's identity), the global batch."""
    state = TrainerState(world_size=world, global_batch=ds_config["train_batch_size"])
    state.precision = precision_path(ds_config)
    state.dataset = dataset
    if not resume:
        return state
    saved = TrainerState.from_dict(ckpt.read_trainer_state(*resume))
    where = resume[0] / resume[1]
    saved_path = saved.precision or ckpt.guess_precision_path(where)
    if saved_path and saved_path != state.precision:
        raise UserError(
            f"checkpoint {where} was saved by DeepSpeed's {saved_path}, but this run would load it into "
            f"{state.precision}; keep the checkpoint's precision and ZeRO settings (precision, optimizer.zero_stage)"
        )
    if saved.dataset and saved.dataset != state.dataset:
        if saved.dataset.get("tokenizer") != state.dataset["tokenizer"]:
            raise UserError(
                f"checkpoint {where} was trained with another tokenizer than {cfg.data.path}'s: its token ids "
                "mean other words; export it and start from it with model.init_from instead"
            )
        if not cfg.data.new_dataset:
            raise UserError(
                f"checkpoint {where} was trained on another dataset than {cfg.data.path} (same tokenizer, "
                "another index); set data.new_dataset=true to continue on this one from its beginning"
            )
        if rank == 0:
            print(
                f"mosaicbert-ds: data.new_dataset: {cfg.data.path} replaces the checkpoint's dataset; its "
                "data position starts at the beginning",
                file=sys.stderr,
                flush=True,
            )
        saved.train_loader = {}
    if saved.global_batch and saved.global_batch != state.global_batch and rank == 0:
        print(
            f"mosaicbert-ds: warning: the global batch changes from {saved.global_batch} to {state.global_batch} "
            f"sequences on resume: from step {saved.step} on each step sees {state.global_batch} sequences (the "
            "learning-rate schedule, duration.steps and the interval settings count steps of the new size; "
            "duration.samples and the data position count samples)",
            file=sys.stderr,
            flush=True,
        )
    saved.precision, saved.dataset, saved.global_batch = state.precision, state.dataset, state.global_batch
    return saved


def restore(
    engine: Any,
    train_loader: Any,
    state: TrainerState,
    resume: tuple[Path, str],
    cfg: RunConfig,
    total_steps: int,
    world: int,
    rank: int,
) -> None:
    """Weights, optimizer, schedule, data position and RNG from the checkpoint; the schedule is
    recomputed when the run's duration changed."""
    root, tag = resume
    same_world = state.world_size == world
    engine.load_checkpoint(str(root), tag=tag if same_world else f"{tag}_universal")
    if state.train_loader:
        train_loader.load_state_dict(state.train_loader)
    ckpt.load_rng(root, tag, rank, required=same_world)
    schedule = cfg.schedule
    old_total = retarget_schedule(
        engine.lr_scheduler,
        total_steps,
        schedule.warmup_fraction,
        schedule.final_lr_ratio,
        schedule.min_warmup_steps,
        budget=bool(cfg.duration.train_seconds),
    )
    if old_total != total_steps and rank == 0:
        print(
            f"mosaicbert-ds: the duration changes from {old_total} to {total_steps} steps: the learning-"
            f"rate schedule is recomputed for {total_steps} steps (lr now {engine.get_lr()[0]:.3g})",
            file=sys.stderr,
            flush=True,
        )
