"""`mosaicbert-ds pretrain RUN [key=value ...]`: MLM pretraining with a DeepSpeed engine.

One CPU (smoke run, gloo), one GPU, or many nodes:

    mosaicbert-ds pretrain tiny-cpu data.path=runs/data
    mosaicbert-ds pretrain mosaicbert-base data.path=/data/c4-mds              # 1 GPU
    deepspeed --num_gpus 8 --no_local_rank --module mosaicbert_ds.cli pretrain mosaicbert-base \\
        data.path=/data/c4-mds                                                 # 1 node
    launch/deepspeed_hostfile.sh mosaicbert-base data.path=... deepspeed_config=ds_configs/mosaicbert-base_64gpu.json

`setup` (config, data, engine, resume) returns a `Run`; the loop then reads top to bottom:
`train` (loop, eval, checkpoint, stop), `train_step` (accumulation over micro batches, optimizer
step), `forward_backward` (one micro batch). The host waits for the GPU only at log, eval and
checkpoint intervals; those are also where ranks agree to stop (a signal, duration.wall_time,
divergence: train.stops, train.health). Exit codes: train.stops and docs/reliability.md.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..batch import MLMBatch, is_packed
from ..config import MosaicBertConfig
from ..errors import UserError
from ..flops import mfu, paper_flops_per_token, peak_flops, training_flops
from ..model import MosaicBertForMaskedLM
from ..outputs import atomic_write_json, atomic_write_text
from . import checkpoint as ckpt
from .graphed import GraphedEngineStep
from .health import MAX_STREAK, SLOTS, STOP, Health, describe_divergence, weights_finite
from .metrics import MetricsLogger, console_line
from .output_lock import OutputLock
from .preflight import check_run
from .run_config import RunConfig, load_run_config
from .schedule import fit_schedule_to_budget, make_scheduler, retarget_schedule
from .stops import SIGNAL, WALL_TIME, ExitCode, RunStopped, StopRequests, parse_duration


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "    mosaicbert-ds pretrain tiny-cpu data.path=runs/data                       # CPU smoke run\n"
        "    mosaicbert-ds pretrain mosaicbert-base data.path=/data/c4-mds duration.steps=1000   # 1 GPU\n"
        "    mosaicbert-ds pretrain my_run.yaml --dry-run                              # check, then exit\n"
        "    deepspeed --num_gpus 8 --no_local_rank --module mosaicbert_ds.cli pretrain mosaicbert-base \\\n"
        "        data.path=/data/c4-mds                                                # 1 node, 8 GPUs"
    )
    parser.add_argument("run", help="run file (YAML/JSON) or bundled recipe name, e.g. mosaicbert-base")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. duration.steps=100")
    parser.add_argument("--dry-run", action="store_true", help="check the run file, data and ds_config, then exit")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="train at most N more steps, save a checkpoint and exit (for job time limits); "
        "running the same command again resumes",
    )


@dataclass
class TrainerState:
    step: int = 0
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    """Wall-clock seconds spent training (not evaluating or checkpointing): the Pareto x-axis."""
    world_size: int = 1
    global_batch: int = 0
    """Sequences per optimizer step when saved (0: not recorded)."""
    train_loader: dict = field(default_factory=dict)


class Window:
    """Per-log-interval sums kept on the device so that no micro step waits for the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=self.device, dtype=torch.float64)
        self.micro = 0
        self.masked = 0
        self.tokens = 0
        self.samples = 0
        self.flops = 0.0
        self.start = time.perf_counter()


def batch_stats(batch: MLMBatch) -> tuple[int, int, int, list[int]]:
    """(sequences, real tokens, masked tokens, sequence lengths), read from CPU tensors."""
    if is_packed(batch):
        cu = batch["cu_seqlens"]
        lens = (cu[1:] - cu[:-1]).tolist()
        return len(lens), batch["input_ids"].numel(), batch["masked_positions"].numel(), lens
    lens = batch["attention_mask"].sum(1).tolist()
    return len(lens), sum(lens), batch["masked_positions"].numel(), lens


def to_device(batch: MLMBatch, device: torch.device) -> MLMBatch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_backward(
    engine: Any,
    batch: dict[str, Any],
    n_masked: int,
    weight: torch.Tensor | float,
    window: Window,
    graphed: GraphedEngineStep | None = None,
) -> torch.Tensor:
    """One micro batch. The model's loss is the mean over this micro batch's masked tokens;
    `weight` rescales it so the step's gradient is that of the mean over every masked token of
    the global batch, whatever the split into ranks and micro batches. With `graphed`, forward and
    backward are one CUDA-graph replay (train.graphed)."""
    if graphed is not None:
        out = graphed(batch, n_masked * weight)
    else:
        out = engine(**batch)
        engine.backward(out.loss * (n_masked * weight))
    loss = out.loss.detach().double() * n_masked
    window.loss += loss
    window.correct += (out.logits.detach().argmax(-1) == out.masked_labels).sum().double()
    return loss


def train_step(
    engine: Any,
    batches: Iterator[dict[str, Any]],
    accum: int,
    world: int,
    window: Window,
    config: MosaicBertConfig,
    graphed: GraphedEngineStep | None = None,
) -> torch.Tensor:
    """One optimizer step; returns this rank's summed masked-token loss of the step (on the device)."""
    group = [next(batches) for _ in range(accum)]  # CPU batches: their sizes are known without a sync
    stats = [batch_stats(batch) for batch in group]
    # DeepSpeed averages gradients over ranks and accumulation steps; undo that and divide by the
    # global masked-token count instead (summed on the device from pinned memory: no host sync).
    local_masked = float(sum(s[2] for s in stats))
    if dist.is_initialized() and world > 1:
        masked = torch.tensor([local_masked])
        if engine.device.type == "cuda":
            masked = masked.pin_memory()
        masked = masked.to(engine.device, non_blocking=True)
        dist.all_reduce(masked)
        weight: torch.Tensor | float = (world * accum) / masked
    else:
        weight = accum / local_masked
    step_loss = torch.zeros((), device=engine.device, dtype=torch.float64)
    for batch, (n_seq, n_tok, n_masked, lens) in zip(group, stats):
        window.samples += n_seq
        window.tokens += n_tok
        window.masked += n_masked
        window.micro += 1
        window.flops += training_flops(config, lens, n_masked)
        step_loss += forward_backward(engine, to_device(batch, engine.device), n_masked, weight, window, graphed)
        engine.step()
    return step_loss


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def interval_metrics(
    engine: Any, window: Window, world: int, n_params: int, peak: float | None, health: torch.Tensor
) -> tuple[dict[str, float], dict[str, float], list[list[float]]]:
    """Reduce the window and every rank's health row over ranks (one collective: the interval's
    only host sync).

    Returns the logged metrics, the interval's global totals (samples, tokens, seconds) and the
    per-rank health rows (train.health).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    rows = torch.zeros(world, health.numel(), dtype=torch.float64, device=engine.device)
    rows[rank] = health
    sums = torch.stack([window.loss, window.correct]).to(torch.float64)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    # The mean of the ranks' clocks: every rank then takes the same time-based decisions (timed
    # eval and checkpoints, the budget's end), which would hang collectives if they differed.
    seconds = time.perf_counter() - window.start
    host = torch.tensor(
        [window.micro, window.masked, window.tokens, window.samples, window.flops, seconds], dtype=torch.float64
    ).to(engine.device)
    reduced = torch.cat([sums, host, rows.flatten()])
    if dist.is_initialized():
        dist.all_reduce(reduced)
    reduced = reduced.tolist()
    loss, correct, micro, masked, tokens, samples, flops, seconds = reduced[:8]
    seconds /= world
    width = health.numel()
    health_rows = [reduced[8 + r * width : 8 + (r + 1) * width] for r in range(world)]
    steps = micro / (world * engine.gradient_accumulation_steps())
    grad_norm = engine.get_global_grad_norm()
    metrics = {
        "loss/train": loss / max(masked, 1),  # mean over every masked token of the interval
        "accuracy/train": correct / max(masked, 1),
        "optim/lr": engine.get_lr()[0],
        "optim/grad_norm": float(grad_norm) if grad_norm is not None else None,
        "throughput/tokens_per_sec": tokens / seconds,
        "throughput/tokens_per_sec_per_gpu": tokens / seconds / world,
        "throughput/samples_per_sec": samples / seconds,
        "throughput/samples_per_sec_per_gpu": samples / seconds / world,
        "throughput/step_time_sec": seconds / max(steps, 1),
        "throughput/mfu": mfu(paper_flops_per_token(n_params) * tokens / seconds, world, peak),
        "throughput/mfu_exact": mfu(flops / seconds, world, peak),
    }
    metrics["optim/nonfinite_steps"] = max(r[0] for r in health_rows)
    if engine.device.type == "cuda":
        metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics, {"samples": samples, "tokens": tokens, "seconds": seconds, "steps": steps}, health_rows


@torch.no_grad()
def evaluate(engine: Any, loader: Any, max_batches: int) -> dict[str, float]:
    """MLM loss (per masked token) and accuracy on the held-out split, summed over ranks."""
    engine.eval()
    loss = torch.zeros((), device=engine.device, dtype=torch.float64)
    correct = torch.zeros((), device=engine.device, dtype=torch.float64)
    masked = 0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        n_masked = batch_stats(batch)[2]
        out = engine(**to_device(batch, engine.device))
        loss += out.loss.double() * n_masked
        correct += (out.logits.argmax(-1) == out.masked_labels).sum().double()
        masked += n_masked
    engine.train()
    loss_sum, correct_sum, masked_sum = all_sum([loss.item(), correct.item(), masked], engine.device)
    return {"loss/eval": loss_sum / max(masked_sum, 1), "accuracy/eval": correct_sum / max(masked_sum, 1)}


def forever(loader: Any) -> Iterator[dict[str, Any]]:
    """Iterate epochs back to back (the streaming dataset reshuffles each epoch)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training split yielded no batch: it has fewer samples than one global batch")


def build_engine(
    model_config: MosaicBertConfig,
    ds_config: dict[str, Any],
    total_steps: int,
    warmup_fraction: float,
    final_lr_ratio: float,
    seed: int = 17,
    compile_layers: bool = False,
    batched_optimizer: bool = False,
    init_state: dict[str, torch.Tensor] | None = None,
    gradient_checkpointing: bool = False,
) -> tuple[Any, int]:
    """The DeepSpeed engine around a freshly initialised MosaicBertForMaskedLM, and its parameter count.

    On one rank the engine's gradient all-reduce is skipped (train.deepspeed_internals).
    batched_optimizer: BF16_Optimizer's per-parameter loops (gradient accumulation, gradient norm,
    clipping) replaced by foreach ops (train.deepspeed_internals; the same numbers; off by default:
    no measured gain on an H200)."""
    import deepspeed

    from .deepspeed_internals import check_version, prepare_engine

    check_version()
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = MosaicBertForMaskedLM(model_config)
    if init_state is not None:  # model.init_from: every weight from the source, checked at import
        model.load_state_dict(init_state, strict=True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    if compile_layers:
        for layer in model.bert.layers:
            layer.compile(dynamic=True)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ds_config,
        lr_scheduler=make_scheduler(total_steps, warmup_fraction, final_lr_ratio),
    )
    prepare_engine(engine, batched_optimizer=batched_optimizer)
    return engine, n_params


@dataclass
class Run:
    """Everything `setup` prepares for the loop: the config, the engine, the data, the state."""

    cfg: RunConfig
    model_config: MosaicBertConfig
    engine: Any
    n_params: int
    train_loader: Any
    eval_loader: Any
    state: TrainerState
    total_steps: int
    accum: int
    world: int
    rank: int
    out_dir: Path
    ckpt_root: Path
    logger: MetricsLogger
    peak: float | None
    graphed: GraphedEngineStep | None
    lock: OutputLock
    health: Health
    stops: StopRequests
    deadline: float | None
    """time.monotonic() after which the run stops (duration.wall_time), or None."""
    last_saved: str | None = None
    """The newest complete checkpoint tag (this run's or the one it resumed from)."""
    loss_mean: float | None = None
    """Running mean of the interval losses, for the spike warning."""
    bar: Any = None
    timed_eval: bool = False
    timed_ckpt: bool = False
    """Whether this log interval crossed an eval.interval_seconds / checkpoint.interval_seconds point."""
    budget_reached: bool = False
    """duration.train_seconds is used up: the loop ends at this step, as at its last one."""

    def close(self) -> None:
        self.stops.restore()
        if self.bar is not None:
            self.bar.close()
        self.logger.close()
        self.lock.release()


def setup(cfg: RunConfig, dry_run: bool = False) -> Run | dict[str, Any]:
    """Config, data, engine, resume: everything before the first step. UserError on bad input.
    With `dry_run`, stop after the checks and return what the run would use."""
    from ..data import build_mlm_dataloader, read_dataset_info
    from .distributed import init_distributed

    started = time.monotonic()
    info = read_dataset_info(cfg.data.path, cfg.data.remote_cache)
    init_state = None
    if cfg.model.init_from:
        from ..interop.init_from import config_and_weights

        model_config, init_state = config_and_weights(cfg.model.init_from, cfg.model.preset, cfg.model.overrides)
    else:
        model_config = MosaicBertConfig.from_name(
            cfg.model.preset, **{"vocab_size": info["vocab_size"], **cfg.model.overrides}
        )
    if model_config.vocab_size < info["vocab_size"]:
        raise UserError(
            f"model vocab_size {model_config.vocab_size} is smaller than the dataset's tokenizer ({info['vocab_size']})"
        )
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    if cfg.checkpoint.resume != "none":  # a wrong model shape is the clearer message: check it first
        given = ckpt_root if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume)
        for root in (given, given.parent):
            ckpt.check_model_matches(root, model_config.to_dict())
    env = init_distributed()
    world, rank = env.world_size, env.rank
    ds_config, total_steps = run_ds_config(cfg, world)
    check_run(cfg, model_config, ds_config, info)  # data, vocabulary, output folder: before any GPU time
    # the lock comes before reading checkpoints that another run may be writing
    lock = OutputLock.acquire_on_rank0(out_dir, rank) if not dry_run else OutputLock(None)
    resume = ckpt.resolve_resume(cfg.checkpoint.resume, ckpt_root)
    if dry_run:
        return {"ok": True, "world_size": world, "total_steps": total_steps, "ds_config": ds_config}
    accum = ds_config["gradient_accumulation_steps"]
    micro = ds_config["train_micro_batch_size_per_gpu"]

    state = TrainerState(world_size=world)
    same_world = True
    if resume:
        state = TrainerState(
            **{k: v for k, v in ckpt.read_trainer_state(*resume).items() if k in TrainerState.__dataclass_fields__}
        )
        warn_on_batch_change(state, ds_config["train_batch_size"], rank)
        same_world = state.world_size == world
        if not same_world:  # ZeRO shards are laid out per rank: go through the universal format
            if rank == 0:
                ckpt.to_universal(*resume)
            dist.barrier()
            resume = (resume[0], f"{resume[1]}_universal")
            ds_config.setdefault("checkpoint", {})["load_universal"] = True

    engine, n_params = build_engine(
        model_config,
        ds_config,
        total_steps,
        cfg.schedule.warmup_fraction,
        cfg.schedule.final_lr_ratio,
        seed=cfg.seed,
        compile_layers=cfg.compile,
        init_state=init_state,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
    )
    torch.manual_seed(cfg.seed + 1000 * rank + 1)  # different dropout masks per rank
    graphed = GraphedEngineStep(engine) if cfg.cuda_graphs else None

    train_loader = build_mlm_dataloader(
        cfg.data.path,
        split=cfg.data.train_split,
        batch_size=micro,
        mlm_probability=cfg.data.mlm_probability,
        seed=cfg.seed,
        shuffle=True,
        padded=cfg.data.padded,
        num_workers=cfg.data.num_workers,
        remote_cache=cfg.data.remote_cache,
        num_canonical_nodes=cfg.data.num_canonical_nodes,
        accumulation_steps=accum,
        verify_hashes=cfg.data.verify_hashes,
    )
    eval_loader = None
    if cfg.eval.interval or cfg.eval.interval_seconds:
        eval_loader = build_mlm_dataloader(
            cfg.data.path,
            split=cfg.data.eval_split,
            batch_size=micro,
            mlm_probability=cfg.data.eval_mlm_probability,
            seed=cfg.seed,
            shuffle=False,
            padded=cfg.data.padded,
            num_workers=0,
            remote_cache=cfg.data.remote_cache,
            drop_last=False,
            verify_hashes=cfg.data.verify_hashes,
        )

    if resume:
        engine.load_checkpoint(str(resume[0]), tag=resume[1])
        if state.train_loader:
            train_loader.load_state_dict(state.train_loader)
        ckpt.load_rng(*resume, rank, required=same_world)
        old_total = retarget_schedule(
            engine.lr_scheduler, total_steps, cfg.schedule.warmup_fraction, cfg.schedule.final_lr_ratio
        )
        if old_total != total_steps and rank == 0:
            print(
                f"mosaicbert-ds: the duration changes from {old_total} to {total_steps} steps: the learning-"
                f"rate schedule is recomputed for {total_steps} steps (lr now {engine.get_lr()[0]:.3g})",
                file=sys.stderr,
                flush=True,
            )
    state.world_size = world

    if rank == 0:
        write_run_files(cfg, ds_config, model_config, info, out_dir, ckpt_root)
    use_cuda = torch.cuda.is_available()
    run = Run(
        cfg=cfg,
        model_config=model_config,
        engine=engine,
        n_params=n_params,
        train_loader=train_loader,
        eval_loader=eval_loader,
        state=state,
        total_steps=total_steps,
        accum=accum,
        world=world,
        rank=rank,
        out_dir=out_dir,
        ckpt_root=ckpt_root,
        logger=MetricsLogger(out_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard),
        peak=peak_flops(override=cfg.peak_flops) if use_cuda else cfg.peak_flops,
        graphed=graphed,
        lock=lock,
        health=Health(engine.device),
        stops=StopRequests(),
        deadline=started + parse_duration(cfg.duration.wall_time) if cfg.duration.wall_time else None,
        last_saved=resume[1].removesuffix("_universal") if resume else None,
    )
    if rank == 0 and cfg.log.progress_bar:
        from tqdm import tqdm

        run.bar = tqdm(
            total=total_steps, initial=state.step, desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stdout
        )
    return run


def train(cfg: RunConfig, dry_run: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the final summary on rank 0. Raises RunStopped when the
    run ends early (signal, time limit, divergence, failed save) with its exit code and one line."""
    if dry_run:
        return setup(cfg, dry_run=True)
    run = setup(cfg)
    run.stops.install()
    try:
        state, engine = run.state, run.engine
        batches = forever(run.train_loader)
        window = Window(engine.device)
        last: dict[str, float] = {}
        stop_step = run.total_steps if stop_after is None else min(run.total_steps, state.step + stop_after)
        while state.step < stop_step:
            step_loss = train_step(engine, batches, run.accum, run.world, window, run.model_config, run.graphed)
            state.step += 1
            run.health.update(state.step, step_loss, engine.get_global_grad_norm())
            finished = state.step == stop_step
            stop = None
            run.timed_eval = run.timed_ckpt = False
            if state.step % cfg.log.interval == 0 or finished:
                metrics, stop = log_interval(run, window)
                last.update(metrics)
                window.reset()
                if run.budget_reached:
                    finished, stop_step = True, state.step
            if run.bar is not None:
                run.bar.update(1)
            paused = time.perf_counter()  # eval and checkpoint time stay out of the throughput window
            if run.eval_loader is not None and (
                run.timed_eval or finished or (cfg.eval.interval and state.step % cfg.eval.interval == 0)
            ):
                metrics = evaluate(engine, run.eval_loader, cfg.eval.batches)
                last.update(metrics)
                run.logger.log(state.step, metrics)
            if (
                (cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0)
                or finished
                or stop
                or run.timed_ckpt
            ):
                save_checkpoint(run)
            window.start += time.perf_counter() - paused
            if stop:
                raise RunStopped(
                    ExitCode.STOPPED,
                    f"stopped at step {state.step} ({stop}); checkpoint "
                    f"{run.ckpt_root / run.last_saved} is complete: run the same command to resume",
                    {"step": state.step, **last},
                )
        return {"step": state.step, "world_size": run.world, "checkpoint": str(run.ckpt_root), **last}
    finally:
        run.close()


def log_interval(run: Run, window: Window) -> tuple[dict[str, float], str | None]:
    """Reduce, log and check the interval: the point where ranks agree on stopping. Returns the
    metrics and the reason every rank stops now (None to go on); RunStopped on divergence."""
    state = run.state
    local_stop = 0
    if run.stops.signal_name is not None:
        local_stop = SIGNAL
    elif run.deadline is not None and time.monotonic() >= run.deadline:
        local_stop = WALL_TIME
    metrics, totals, rows = interval_metrics(
        run.engine, window, run.world, run.n_params, run.peak, run.health.row(local_stop)
    )
    state.samples += int(totals["samples"])
    state.tokens += int(totals["tokens"])
    before = state.train_seconds
    state.train_seconds += totals["seconds"]
    check_train_seconds(run, before, totals["seconds"] / max(totals["steps"], 1))
    metrics["progress/train_seconds"] = state.train_seconds
    metrics["progress/samples"] = state.samples
    metrics["progress/tokens"] = state.tokens
    metrics["progress/train_hours"] = state.train_seconds / 3600
    run.logger.log(state.step, metrics)
    if run.bar is not None:
        run.bar.set_postfix_str(console_line(metrics), refresh=False)
    run.health.reset_interval()
    check_divergence(run, rows)
    warn_on_spike(run, metrics["loss/train"])
    reason = max(int(r[STOP]) for r in rows)
    if reason == SIGNAL:
        got = run.stops.signal_name or "a signal on another rank"
        return metrics, f"{got}"
    if reason == WALL_TIME:
        return metrics, f"duration.wall_time {run.cfg.duration.wall_time} reached"
    return metrics, None


def check_divergence(run: Run, rows: list[list[float]], weights_ok: bool = True) -> None:
    limit = run.cfg.divergence.max_nonfinite_steps
    if max(r[MAX_STREAK] for r in rows) < limit and weights_ok:
        return
    first, where = describe_divergence(rows, limit)
    what = (
        f"{limit} consecutive non-finite steps from step {first}"
        if weights_ok
        else f"non-finite weights at step {run.state.step}"
    )
    good = f"{run.ckpt_root / run.last_saved}" if run.last_saved else "none"
    raise RunStopped(
        ExitCode.DIVERGED,
        f"diverged at step {run.state.step}: {what} ({where}); no checkpoint written; last good checkpoint: {good}",
        {"step": run.state.step},
    )


def warn_on_spike(run: Run, loss: float) -> None:
    factor = run.cfg.divergence.spike_factor
    if not math.isfinite(loss):
        return
    if factor and run.loss_mean is not None and loss > factor * run.loss_mean and run.rank == 0:
        print(
            f"mosaicbert-ds: warning: loss spike at step {run.state.step}: {loss:.4g} is "
            f"{loss / run.loss_mean:.1f}x the running mean {run.loss_mean:.4g}",
            file=sys.stderr,
            flush=True,
        )
    run.loss_mean = loss if run.loss_mean is None else 0.9 * run.loss_mean + 0.1 * loss


def save_checkpoint(run: Run) -> None:
    """Save a complete checkpoint of this step on every rank, or stop: never a checkpoint of non-finite
    weights (exit 3), never a half-written one taken for finished (exit 5 on a failed write)."""
    state, rank = run.state, run.rank
    tag = f"step_{state.step:07d}"
    if tag == run.last_saved:
        return
    ok = weights_finite(run.engine.module).double()
    flags = torch.stack([1 - ok, torch.zeros((), dtype=torch.float64, device=ok.device)])
    rows = torch.zeros(run.world, SLOTS, dtype=torch.float64, device=ok.device)
    rows[rank] = run.health.row(0)
    reduced = torch.cat([flags, rows.flatten()])
    if dist.is_initialized():
        dist.all_reduce(reduced)
    reduced = reduced.tolist()
    health_rows = [reduced[2 + r * SLOTS : 2 + (r + 1) * SLOTS] for r in range(run.world)]
    check_divergence(run, health_rows, weights_ok=reduced[0] == 0)
    state.train_loader = run.train_loader.state_dict()
    try:
        ckpt.save(run.engine, run.ckpt_root, tag, vars(state), rank)
    except (OSError, RuntimeError) as err:
        if rank == 0:
            ckpt.remove_incomplete(run.ckpt_root, tag)
        good = f"{run.ckpt_root / run.last_saved} is intact" if run.last_saved else "no earlier checkpoint"
        raise RunStopped(
            ExitCode.SAVE_FAILED,
            f"could not save checkpoint {tag} at step {state.step}: {describe_os_error(err, run.ckpt_root)}; {good}",
            {"step": state.step},
        ) from None
    run.last_saved = tag
    if rank == 0:
        ckpt.prune(run.ckpt_root, run.cfg.checkpoint.keep_last)


def describe_os_error(err: BaseException, where: Path) -> str:
    """One phrase for a failed save. torch.save reports a full disk as a RuntimeError without an
    errno, so little free space left after the failure counts as a full disk too."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = None
    if getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < 64 * 2**20):
        return "no space left on device" + (f" ({free / 2**20:.0f} MiB free under {where})" if free is not None else "")
    return text[:200]


def run_ds_config(cfg: RunConfig, world: int) -> tuple[dict[str, Any], int]:
    """The DeepSpeed config for `world` ranks and the run's total optimizer steps."""
    from .ds_config import build_ds_config, load_ds_config

    if cfg.deepspeed_config:
        ds_config = load_ds_config(cfg.deepspeed_config, world)
    else:
        o = cfg.optimizer
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
        ds_config = build_ds_config(
            global_batch=cfg.batch.global_batch,
            micro_batch=cfg.batch.micro_batch,
            world_size=world,
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            optimizer=o.name,
            zero_stage=o.zero_stage,
            gradient_clipping=o.gradient_clipping,
            bf16=bf16,
        )
    total_steps = cfg.duration.steps or math.ceil(cfg.duration.samples / ds_config["train_batch_size"])
    return ds_config, total_steps


def warn_on_batch_change(state: TrainerState, global_batch: int, rank: int) -> None:
    old = state.global_batch
    if old and old != global_batch and rank == 0:
        print(
            f"mosaicbert-ds: warning: the global batch changes from {old} to {global_batch} sequences on "
            f"resume: from step {state.step} on each step sees {global_batch} sequences (the learning-rate "
            "schedule, duration.steps and the interval settings count steps of the new size; "
            "duration.samples and the data position count samples)",
            file=sys.stderr,
            flush=True,
        )
    state.global_batch = global_batch


def write_run_files(
    cfg: RunConfig,
    ds_config: dict[str, Any],
    model_config: MosaicBertConfig,
    info: dict[str, Any],
    out_dir: Path,
    ckpt_root: Path,
) -> None:
    """Rank 0: the resolved configs, and what export needs beside the checkpoints."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "run_config.json", cfg.to_dict())
    atomic_write_json(out_dir / "ds_config.json", ds_config)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ckpt_root / "model_config.json", model_config.to_json_string())
    tokenizer_dir = Path(info.get("tokenizer_dir", "")) if info.get("tokenizer_dir") else None
    if tokenizer_dir and tokenizer_dir.is_dir() and not (ckpt_root / "tokenizer").exists():
        tmp = ckpt_root / f".tokenizer.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tokenizer_dir, tmp)
        os.replace(tmp, ckpt_root / "tokenizer")


def check_train_seconds(run: Run, before: float, step_seconds: float) -> None:
    """Wall-clock points in training seconds (eval and checkpoint time excluded): timed eval and
    checkpoints, and the duration.train_seconds budget, whose schedule is fitted to end there."""
    cfg, state = run.cfg, run.state
    run.timed_eval = _crossed(before, state.train_seconds, cfg.eval.interval_seconds)
    run.timed_ckpt = _crossed(before, state.train_seconds, cfg.checkpoint.interval_seconds)
    budget = cfg.duration.train_seconds
    if budget:
        if state.train_seconds >= budget:
            run.budget_reached = True
        elif before > 0:  # the first interval holds start-up and compilation: not a step time
            fit_schedule_to_budget(
                run.engine.lr_scheduler.lr_lambdas[0],
                state.step,
                (budget - state.train_seconds) / step_seconds,
                run.total_steps,
                cfg.schedule.warmup_fraction,
            )


def _crossed(before: float, after: float, interval: float) -> bool:
    """Whether training seconds passed a multiple of `interval` between two log points."""
    return bool(interval) and math.floor(after / interval) > math.floor(before / interval)


def main(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.run, args.overrides)
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        summary = train(cfg, dry_run=args.dry_run, stop_after=args.stop_after)
    except RunStopped as stopped:
        if is_main:
            if stopped.code == ExitCode.STOPPED and stopped.summary:
                print(json.dumps(stopped.summary, indent=1))
            print(f"mosaicbert-ds pretrain: {stopped.message}", file=sys.stderr, flush=True)
        return int(stopped.code)
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    print(
        json.dumps({k: summary[k] for k in summary if k != "ds_config"}, indent=1)
        if not args.dry_run
        else f"run file OK: {summary['world_size']} rank(s), {summary['total_steps']} steps"
    )
    return 0
