"""`mosaicbert-ds pretrain RUN [key=value ...]`: MLM pretraining with a DeepSpeed engine.

One CPU (smoke run, gloo), one GPU, or many nodes:

    mosaicbert-ds pretrain tiny-cpu data.path=runs/data
    mosaicbert-ds pretrain mosaicbert-base data.path=/data/c4-mds              # 1 GPU
    deepspeed --num_gpus 8 --no_local_rank --module mosaicbert_ds.cli pretrain mosaicbert-base \\
        data.path=/data/c4-mds                                                 # 1 node
    launch/deepspeed_hostfile.sh mosaicbert-base data.path=... deepspeed_config=ds_configs/mosaicbert-base_64gpu.json

Read top to bottom: `train` (signals first, then set-up, then the loop), `loop` (one optimizer
step, then what the log interval, the evaluator and the checkpointer say is due), `plan` (every
check before GPU time), `setup` (lock, engine, loaders, restore). The pieces: train.step (one
optimizer step over micro batches), train.intervals (log intervals: where ranks agree and the
loop learns what to do next), train.evaluator, train.checkpointer, train.engine (the DeepSpeed
config and engine), train.resume (checking and restoring a checkpoint), train.run_folder (the
output folder). Exit codes: train.stops
and docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import MosaicBertConfig
from ..errors import UserError
from ..flops import peak_flops
from . import checkpoint as ckpt
from .checkpointer import Checkpointer, TrainerState
from .engine import build_engine, resolve_ds_config, use_graphs
from .evaluator import Evaluator
from .graphed_engine_step import GraphedEngineStep
from .health import Health
from .intervals import NOTHING, Intervals
from .metrics import MetricsLogger
from .output_lock import OutputLock
from .plateau import PlateauWatch
from .preflight import check_run
from .reduce import all_reduce_named
from .resume import read_resume_state, restore
from .run_config import RunConfig, load_run_config
from .run_folder import check_fresh_start, clear_previous_run, write_run_files
from .step import train_step
from .stops import ExitCode, RunStopped, StopRequests, parse_duration, stop_requests
from .token_batches import describe_batches, graph_token_step


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
        help="train at most N (>= 1) more steps, save a checkpoint and exit 0 (for job time limits); "
        "running the same command again resumes",
    )


def train(cfg: RunConfig, dry_run: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the final summary on rank 0. Raises RunStopped when the
    run ends early (signal, time limit, divergence, failed save) with its exit code and one line."""
    if stop_after is not None and stop_after < 1:
        raise UserError(f"--stop-after must be a positive number of steps, got {stop_after}")
    stops = stop_requests()  # recording since the package's import in a `pretrain` process
    stops.install()  # (else from here): a signal during set-up stops cleanly too
    try:
        checked = plan(cfg)
        if dry_run:  # the checkpoint to resume too, without the lock (nothing is written)
            resume = ckpt.resolve_resume(cfg.checkpoint.resume, Path(cfg.output_dir) / "checkpoints")
            check_fresh_start(cfg, resume)
            read_resume_state(cfg, checked.ds_config, checked.info["identity"], resume, checked.world, checked.rank)
            return {"ok": True, "world_size": checked.world, "total_steps": checked.total_steps, **checked.summary()}
        run = setup(checked, stops)
        try:
            stop_if_asked_before_start(run, stops)
            return loop(run, stop_after)
        finally:
            run.close()
    finally:
        stops.restore()


def loop(run: Run, stop_after: int | None) -> dict[str, Any]:
    cfg, state, engine = run.cfg, run.state, run.engine
    stop_step = run.total_steps if stop_after is None else min(run.total_steps, state.step + stop_after)
    batches = forever(run.train_loader)
    last: dict[str, float] = {}
    while state.step < stop_step:
        step_loss = train_step(
            engine, batches, run.accum, run.world, run.intervals.window, run.model_config, run.graphed
        )
        state.step += 1
        run.health.update(state.step, step_loss, engine.get_global_grad_norm())
        last_step = state.step == stop_step
        result = run.intervals.close() if run.intervals.due(state.step, last_step) else NOTHING
        last.update(result.metrics)
        last_step = last_step or result.budget_reached
        with run.intervals.paused():  # eval and checkpoint time stay out of the throughput window
            if run.evaluator.due(state.step, last_step, result.evaluate):
                metrics = run.evaluator.evaluate(engine)
                run.plateau.observe(state.step, metrics)
                last.update(metrics)
                run.logger.log(state.step, metrics)
            if run.checkpointer.save_due(state.step, last_step, result.stop is not None, result.checkpoint):
                run.checkpointer.save(engine, state, run.train_loader, run.health, cfg.divergence.max_nonfinite_steps)
        if result.stop:
            raise RunStopped(
                ExitCode.STOPPED,
                f"stopped at step {state.step} ({result.stop}); checkpoint {run.checkpointer.last_good()} "
                "is complete: run the same command to resume",
                {"step": state.step, **last},
            )
        if last_step:
            break
    return {"step": state.step, "world_size": run.world, "checkpoint": str(run.checkpointer.root), **last}


def forever(loader: Any) -> Iterator[dict[str, Any]]:
    """Iterate epochs back to back (the streaming dataset reshuffles each epoch)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the training split yielded no batch: it has fewer samples than one global batch")


def stop_if_asked_before_start(run: Run, stops: StopRequests) -> None:
    """A signal that came during set-up stops every rank before the first step (exit 4)."""
    sums, _ = all_reduce_named({"signal": float(stops.signal_name is not None)}, device=run.engine.device)
    if not sums["signal"]:
        return
    got = stops.signal_name or "a signal on another rank"
    saved = run.checkpointer.last_saved
    what = (
        f"checkpoint {run.checkpointer.last_good()} is complete: run the same command to resume"
        if saved
        else "nothing to save yet: run the same command to start"
    )
    raise RunStopped(ExitCode.STOPPED, f"stopped before step {run.state.step + 1} ({got}); {what}", {})


@dataclass
class Plan:
    """What a run will use, known before any GPU time: `plan` checks it all (--dry-run stops here)."""

    cfg: RunConfig
    info: dict[str, Any]
    """The dataset index (data.info.read_dataset_info)."""
    model_config: MosaicBertConfig
    init_state: dict[str, torch.Tensor] | None
    ds_config: dict[str, Any]
    total_steps: int
    world: int
    rank: int
    graphs: bool

    def summary(self) -> dict[str, Any]:
        return {"ds_config": self.ds_config, "cuda_graphs": self.graphs}


def plan(cfg: RunConfig) -> Plan:
    """Config, data, model and DeepSpeed config, checked against each other. UserError on bad input."""
    from ..data import read_dataset_info
    from .distributed import init_distributed

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
    if cfg.checkpoint.resume != "none":  # a wrong model shape is the clearer message: check it first
        given = Path(cfg.output_dir) / "checkpoints" if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume)
        for root in (given, given.parent):
            ckpt.check_model_matches(root, model_config.to_dict())
    env = init_distributed()
    ds_config, total_steps = resolve_ds_config(cfg, env.world_size)
    graphs = use_graphs(cfg, ds_config)
    if cfg.duration.wall_time:
        parse_duration(cfg.duration.wall_time)
    check_run(cfg, model_config, ds_config, info)  # data, vocabulary, output folder: before any GPU time
    return Plan(cfg, info, model_config, init_state, ds_config, total_steps, env.world_size, env.rank, graphs)


@dataclass
class Run:
    """Everything the loop uses, made by `setup`."""

    cfg: RunConfig
    model_config: MosaicBertConfig
    engine: Any
    state: TrainerState
    total_steps: int
    accum: int
    world: int
    train_loader: Any
    graphed: GraphedEngineStep | None
    health: Health
    logger: MetricsLogger
    intervals: Intervals
    evaluator: Evaluator
    checkpointer: Checkpointer
    plateau: PlateauWatch
    lock: OutputLock

    def close(self) -> None:
        self.intervals.close_bar()
        self.logger.close()
        self.lock.release()


def setup(p: Plan, stops: StopRequests) -> Run:
    """Lock the output folder, read the checkpoint to resume, build the engine and the loaders,
    restore, and make the loop's components."""
    cfg, rank, world = p.cfg, p.rank, p.world
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    started = time.monotonic()
    lock = OutputLock.acquire_on_rank0(out_dir, rank)  # before reading checkpoints another run may write
    try:
        resume = ckpt.resolve_resume(cfg.checkpoint.resume, ckpt_root)
        replace = check_fresh_start(cfg, resume)
        state = read_resume_state(cfg, p.ds_config, p.info["identity"], resume, world, rank)
        if replace and rank == 0:
            clear_previous_run(out_dir)
        if resume and state.world_size != world:  # ZeRO shards are laid out per rank: the universal format
            if rank == 0:
                ckpt.to_universal(*resume)
            if dist.is_initialized():
                dist.barrier()
            p.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        engine, n_params = build_engine(
            p.model_config,
            p.ds_config,
            p.total_steps,
            cfg.schedule.warmup_fraction,
            cfg.schedule.final_lr_ratio,
            seed=cfg.seed,
            compile_layers=cfg.compile,
            init_state=p.init_state,
            gradient_checkpointing=cfg.model.gradient_checkpointing,
            batched_optimizer=p.graphs,  # the optimizer step without host syncs, where the host is quick
            min_warmup_steps=cfg.schedule.min_warmup_steps,
        )
        torch.manual_seed(cfg.seed + 1000 * rank + 1)  # different dropout masks per rank
        train_loader, eval_loader = build_loaders(cfg, p.ds_config)
        if resume:
            restore(engine, train_loader, state, resume, cfg, p.total_steps, world, rank)
        state.world_size = world
        if rank == 0:
            write_run_files(cfg, p.ds_config, p.model_config, p.info)
    except BaseException:
        lock.release()
        raise
    checkpointer = Checkpointer(
        ckpt_root,
        cfg.checkpoint.interval,
        cfg.checkpoint.interval_seconds,
        cfg.checkpoint.keep_last,
        rank,
        world,
        last_saved=resume[1].removesuffix("_universal") if resume else None,
    )
    logger = MetricsLogger(out_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard)
    health = Health(engine.device)
    bar = None
    if rank == 0 and cfg.log.progress_bar:
        from tqdm import tqdm

        bar = tqdm(
            total=p.total_steps, initial=state.step, desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stdout
        )
    intervals = Intervals(
        cfg,
        engine,
        state,
        p.total_steps,
        world,
        n_params,
        peak_flops(override=cfg.peak_flops) if torch.cuda.is_available() else cfg.peak_flops,
        logger,
        health,
        stops,
        deadline=started + parse_duration(cfg.duration.wall_time) if cfg.duration.wall_time else None,
        last_good=checkpointer.last_good,
        bar=bar,
    )
    return Run(
        cfg=cfg,
        model_config=p.model_config,
        engine=engine,
        state=state,
        total_steps=p.total_steps,
        accum=p.ds_config["gradient_accumulation_steps"],
        world=world,
        train_loader=train_loader,
        graphed=GraphedEngineStep(engine, graph_token_step(cfg.batch.micro_tokens)) if p.graphs else None,
        health=health,
        logger=logger,
        intervals=intervals,
        evaluator=Evaluator(eval_loader, cfg.eval.interval, cfg.eval.batches),
        checkpointer=checkpointer,
        plateau=PlateauWatch.for_run(cfg, p.info, engine.lr_scheduler, rank),
        lock=lock,
    )


def build_loaders(cfg: RunConfig, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """The training loader (resumable, whole optimizer steps) and the held-out one (None without eval).
    With batch.micro_tokens each training item is a rank's whole step as a list of micro batches
    (train.token_batches); held-out batches are split by the same budget. Rank 0 prints one line
    saying what a step and a micro batch hold."""
    from ..data import build_mlm_dataloader, read_dataset_info

    info = read_dataset_info(cfg.data.path, cfg.data.remote_cache)
    if os.environ.get("RANK", "0") == "0":
        print(describe_batches(cfg, ds_config, info), file=sys.stderr, flush=True)
    common = dict(
        batch_size=ds_config["train_micro_batch_size_per_gpu"],
        seed=cfg.seed,
        padded=cfg.data.padded,
        remote_cache=cfg.data.remote_cache,
        verify_hashes=cfg.data.verify_hashes,
        micro_tokens=cfg.batch.micro_tokens,
    )
    train_loader = build_mlm_dataloader(
        cfg.data.path,
        split=cfg.data.train_split,
        mlm_probability=cfg.data.mlm_probability,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        num_canonical_nodes=cfg.data.num_canonical_nodes,
        accumulation_steps=ds_config["gradient_accumulation_steps"],
        **common,
    )
    if not (cfg.eval.interval or cfg.eval.interval_seconds):
        return train_loader, None
    if cfg.batch.micro_tokens:  # about one budget of samples per read
        common["batch_size"] = max(1, cfg.batch.micro_tokens // int(info["max_seq_len"]))
    eval_loader = build_mlm_dataloader(
        cfg.data.path,
        split=cfg.data.eval_split,
        mlm_probability=cfg.data.eval_mlm_probability,
        shuffle=False,
        num_workers=0,
        drop_last=False,
        **common,
    )
    return train_loader, eval_loader


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
        + (", CUDA graphs" if summary.get("cuda_graphs") else "")
    )
    return 0
