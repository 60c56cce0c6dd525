"""`mosaicbert-ds pretrain RUN [key=value ...]`: MLM pretraining with a DeepSpeed engine.

One CPU (smoke run, gloo), one GPU, or many nodes:

    mosaicbert-ds pretrain tiny-cpu data.path=runs/data
    mosaicbert-ds pretrain mosaicbert-base data.path=/data/c4-mds              # 1 GPU
    deepspeed --num_gpus 8 --no_local_rank --module mosaicbert_ds.cli pretrain mosaicbert-base \\
        data.path=/data/c4-mds                                                 # 1 node
    launch/deepspeed_hostfile.sh mosaicbert-base data.path=... deepspeed_config=ds_configs/mosaicbert-base_64gpu.json

The loop reads top to bottom: `train` (resume, loop, eval, checkpoint), `train_step`
(accumulation over micro batches, optimizer step), `forward_backward` (one micro batch).
The host waits for the GPU only at log, eval and checkpoint intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..errors import UserError
from ..config import MosaicBertConfig
from ..flops import mfu, paper_flops_per_token, peak_flops, training_flops
from ..model import MosaicBertForMaskedLM
from . import checkpoint as ckpt
from .metrics import MetricsLogger, console_line
from .run_config import RunConfig, load_run_config
from .graphed import GraphedEngineStep
from .schedule import make_scheduler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run file (YAML/JSON) or bundled recipe name, e.g. mosaicbert-base")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. duration.steps=100")
    parser.add_argument("--dry-run", action="store_true", help="check the run file, data and ds_config, then exit")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N",
                        help="train at most N more steps, save a checkpoint and exit (for job time limits); "
                             "running the same command again resumes")


@dataclass
class TrainerState:
    step: int = 0
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    """Wall-clock seconds spent training (not evaluating or checkpointing): the Pareto x-axis."""
    world_size: int = 1
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


def batch_stats(batch: dict[str, Any]) -> tuple[int, int, int, list[int]]:
    """(sequences, real tokens, masked tokens, sequence lengths), read from CPU tensors."""
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"]
        lens = (cu[1:] - cu[:-1]).tolist()
        return len(lens), batch["input_ids"].numel(), batch["masked_positions"].numel(), lens
    lens = batch["attention_mask"].sum(1).tolist()
    return len(lens), sum(lens), batch["masked_positions"].numel(), lens


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_backward(engine: Any, batch: dict[str, Any], n_masked: int, weight: torch.Tensor | float,
                     window: Window, graphed: GraphedEngineStep | None = None) -> None:
    """One micro batch. The model's loss is the mean over this micro batch's masked tokens;
    `weight` rescales it so the step's gradient is that of the mean over every masked token of
    the global batch, whatever the split into ranks and micro batches. With `graphed`, forward and
    backward are one CUDA-graph replay (train.graphed)."""
    if graphed is not None:
        out = graphed(batch, n_masked * weight)
    else:
        out = engine(**batch)
        engine.backward(out.loss * (n_masked * weight))
    window.loss += out.loss.detach().double() * n_masked
    window.correct += (out.logits.detach().argmax(-1) == out.masked_labels).sum().double()


def train_step(engine: Any, batches: Iterator[dict[str, Any]], accum: int, world: int, window: Window,
               config: MosaicBertConfig, graphed: GraphedEngineStep | None = None) -> None:
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
    for batch, (n_seq, n_tok, n_masked, lens) in zip(group, stats):
        window.samples += n_seq
        window.tokens += n_tok
        window.masked += n_masked
        window.micro += 1
        window.flops += training_flops(config, lens, n_masked)
        forward_backward(engine, to_device(batch, engine.device), n_masked, weight, window, graphed)
        engine.step()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def interval_metrics(engine: Any, window: Window, world: int, n_params: int, peak: float | None
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Reduce the window over ranks (one collective: the interval's only host sync).

    Returns the logged metrics and the interval's global totals (samples, tokens, seconds).
    """
    loss, correct, micro, masked, tokens, samples, flops = all_sum(
        [window.loss.item(), window.correct.item(), window.micro, window.masked, window.tokens,
         window.samples, window.flops], engine.device)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - window.start
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
    if engine.device.type == "cuda":
        metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics, {"samples": samples, "tokens": tokens, "seconds": seconds}


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


def build_engine(model_config: MosaicBertConfig, ds_config: dict[str, Any], total_steps: int,
                 warmup_fraction: float, final_lr_ratio: float, seed: int = 17,
                 compile_layers: bool = False, batched_optimizer: bool = True) -> tuple[Any, int]:
    """The DeepSpeed engine around a freshly initialised MosaicBertForMaskedLM, and its parameter count.

    batched_optimizer: BF16_Optimizer's per-parameter loops (gradient accumulation, gradient norm,
    clipping) replaced by foreach ops (train.ds_patches; the same numbers, less host time)."""
    import deepspeed

    from .ds_patches import batch_bf16_optimizer, is_bf16_optimizer

    torch.manual_seed(seed)  # identical initial weights on every rank
    model = MosaicBertForMaskedLM(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    if compile_layers:
        for layer in model.bert.layers:
            layer.compile(dynamic=True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                      lr_scheduler=make_scheduler(total_steps, warmup_fraction, final_lr_ratio))
    if batched_optimizer:
        batch_bf16_optimizer(engine)
    if engine.dp_world_size == 1 and is_bf16_optimizer(engine.optimizer):
        # one rank has nothing to reduce, but DeepSpeed would still flatten every gradient, scale it
        # by 1 and copy it back at each accumulation boundary (the ZeRO optimizers need that call)
        engine.enable_backward_allreduce = False
    return engine, n_params


def train(cfg: RunConfig, dry_run: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) the whole job; returns the final summary on rank 0."""
    from ..data import build_mlm_dataloader, read_dataset_info
    from .distributed import init_distributed
    from .ds_config import build_ds_config, load_ds_config

    info = read_dataset_info(cfg.data.path, cfg.data.remote_cache)
    use_cuda = torch.cuda.is_available()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)
    model_config = MosaicBertConfig.from_name(cfg.model.preset, **{"vocab_size": info["vocab_size"],
                                                                   **cfg.model.overrides})
    if model_config.vocab_size < info["vocab_size"]:
        raise UserError(f"model vocab_size {model_config.vocab_size} is smaller than the dataset's "
                             f"tokenizer ({info['vocab_size']})")
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    resume = ckpt.resolve_resume(cfg.checkpoint.resume, ckpt_root)
    if resume:
        ckpt.check_model_matches(resume[0], model_config.to_dict())

    env = init_distributed()
    world, rank = env.world_size, env.rank
    if cfg.deepspeed_config:
        ds_config = load_ds_config(cfg.deepspeed_config, world)
    else:
        o = cfg.optimizer
        ds_config = build_ds_config(global_batch=cfg.batch.global_batch, micro_batch=cfg.batch.micro_batch,
                                    world_size=world, lr=o.lr, betas=o.betas, eps=o.eps,
                                    weight_decay=o.weight_decay, optimizer=o.name, zero_stage=o.zero_stage,
                                    gradient_clipping=o.gradient_clipping, bf16=bf16)
    global_batch = ds_config["train_batch_size"]
    micro = ds_config["train_micro_batch_size_per_gpu"]
    accum = ds_config["gradient_accumulation_steps"]
    total_steps = cfg.duration.steps or math.ceil(cfg.duration.samples / global_batch)
    if dry_run:
        return {"ok": True, "world_size": world, "total_steps": total_steps, "ds_config": ds_config}

    state = TrainerState(world_size=world)
    if resume:
        state = TrainerState(**ckpt.read_trainer_state(*resume))
        if state.world_size != world:  # ZeRO shards are laid out per rank: go through the universal format
            if rank == 0:
                ckpt.to_universal(*resume)
            dist.barrier()
            resume = (resume[0], f"{resume[1]}_universal")
            ds_config.setdefault("checkpoint", {})["load_universal"] = True

    engine, n_params = build_engine(model_config, ds_config, total_steps, cfg.schedule.warmup_fraction,
                                    cfg.schedule.final_lr_ratio, seed=cfg.seed, compile_layers=cfg.compile)
    torch.manual_seed(cfg.seed + 1000 * rank + 1)  # different dropout masks per rank
    graphed = GraphedEngineStep(engine) if cfg.cuda_graphs else None

    train_loader = build_mlm_dataloader(cfg.data.path, split=cfg.data.train_split, batch_size=micro,
                                        mlm_probability=cfg.data.mlm_probability, seed=cfg.seed, shuffle=True,
                                        padded=cfg.data.padded, num_workers=cfg.data.num_workers,
                                        remote_cache=cfg.data.remote_cache,
                                        num_canonical_nodes=cfg.data.num_canonical_nodes,
                                        accumulation_steps=accum, verify_hashes=cfg.data.verify_hashes)
    eval_loader = None
    if cfg.eval.interval:
        eval_loader = build_mlm_dataloader(cfg.data.path, split=cfg.data.eval_split, batch_size=micro,
                                           mlm_probability=cfg.data.eval_mlm_probability, seed=cfg.seed,
                                           shuffle=False, padded=cfg.data.padded, num_workers=0,
                                           remote_cache=cfg.data.remote_cache, drop_last=False,
                                           verify_hashes=cfg.data.verify_hashes)

    if resume:
        engine.load_checkpoint(str(resume[0]), tag=resume[1])
        if state.train_loader:
            train_loader.load_state_dict(state.train_loader)
        ckpt.load_rng(*resume, rank)
    state.world_size = world

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        (out_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
        ckpt_root.mkdir(parents=True, exist_ok=True)
        model_config.to_json_file(ckpt_root / "model_config.json")
        tokenizer_dir = Path(info.get("tokenizer_dir", "")) if info.get("tokenizer_dir") else None
        if tokenizer_dir and tokenizer_dir.is_dir() and not (ckpt_root / "tokenizer").exists():
            import shutil
            shutil.copytree(tokenizer_dir, ckpt_root / "tokenizer")
    logger = MetricsLogger(out_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard)
    peak = peak_flops(override=cfg.peak_flops) if use_cuda else cfg.peak_flops
    bar = None
    if rank == 0 and cfg.log.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=state.step, desc="pretrain", unit="step", dynamic_ncols=True,
                   file=sys.stdout)

    batches = forever(train_loader)
    window = Window(engine.device)
    last: dict[str, float] = {}
    stop_step = total_steps if stop_after is None else min(total_steps, state.step + stop_after)
    while state.step < stop_step:
        train_step(engine, batches, accum, world, window, model_config, graphed)
        state.step += 1
        finished = state.step == stop_step
        if state.step % cfg.log.interval == 0 or finished:
            metrics, totals = interval_metrics(engine, window, world, n_params, peak)
            state.samples += int(totals["samples"])
            state.tokens += int(totals["tokens"])
            state.train_seconds += totals["seconds"]
            metrics["progress/samples"] = state.samples
            metrics["progress/tokens"] = state.tokens
            metrics["progress/train_hours"] = state.train_seconds / 3600
            last.update(metrics)
            logger.log(state.step, metrics)
            if bar is not None:
                bar.set_postfix_str(console_line(metrics), refresh=False)
            window.reset()
        if bar is not None:
            bar.update(1)
        paused = time.perf_counter()  # eval and checkpoint time stay out of the throughput window
        if eval_loader is not None and (state.step % cfg.eval.interval == 0 or state.step == total_steps):
            metrics = evaluate(engine, eval_loader, cfg.eval.batches)
            last.update(metrics)
            logger.log(state.step, metrics)
        if (cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0) or finished:
            state.train_loader = train_loader.state_dict()
            ckpt.save(engine, ckpt_root, f"step_{state.step:07d}", vars(state), rank)
            if rank == 0:
                ckpt.prune(ckpt_root, cfg.checkpoint.keep_last)
        window.start += time.perf_counter() - paused
    if bar is not None:
        bar.close()
    logger.close()
    return {"step": state.step, "world_size": world, "checkpoint": str(ckpt_root), **last}


def main(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.run, args.overrides)
    summary = train(cfg, dry_run=args.dry_run, stop_after=args.stop_after)
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    print(json.dumps({k: summary[k] for k in summary if k != "ds_config"}, indent=1) if not args.dry_run
          else f"run file OK: {summary['world_size']} rank(s), {summary['total_steps']} steps")
    return 0
