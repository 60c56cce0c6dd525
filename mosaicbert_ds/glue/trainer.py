"""Finetune one GLUE task with one seed: train, evaluate on dev, resume after an interruption.

The loop: the batch of step s is a fixed function of (seed, epoch, position), so a resumed
run sees the same batches an uninterrupted one would; every `save_every` steps (and once
training is done) the state -- model, optimizer, scheduler, step and every rank's RNG -- is
written to <seed dir>/state.pt atomically. Re-running with the same folder continues from
it. `result.json`, written last and atomically, marks the seed as finished; the state is then
deleted. The dev splits are evaluated once, after the last step. For MNLI the finetuned model
(and tokenizer) is also saved to <seed dir>/model, before the result, since RTE, MRPC and
STS-B start from it.

Optimizer: torch AdamW, betas (0.9, 0.98), eps 1e-6, weight decay decoupled from the learning
rate as in the paper (see tasks.Hparams.weight_decay), on every parameter. Schedule: linear
warmup over 6% of the steps, then linear decay to 0.

With cuda_graphs (one GPU, MosaicBERT) each step's forward + backward is a CUDA-graph replay
(glue.graphed_step.GraphedGlueStep, the same loss and gradients); clipping, the optimizer and
the schedule run eagerly as without it (`train_step`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..batch import to_device
from ..errors import UserError
from ..flops import mfu, paper_flops_per_token, peak_flops
from ..outputs import atomic_torch_save, atomic_write_json, output_folder
from ..train.checkpoint import rng_state, set_rng_state
from ..train.schedule import WarmupLinearDecay
from .data import Tokenized
from .graphed_step import GraphedGlueStep
from .metrics import predictions, task_metrics
from .models import load_for_task, uses_packed_batches
from .runtime import Runtime
from .tasks import Hparams, Task

STATE_FILE = "state.pt"
RESULT_FILE = "result.json"
MODEL_DIR = "model"
MODEL_KIND = "glue-model"
"""The output kind of an MNLI model folder (outputs.output_folder)."""


@dataclass
class Hooks:
    """Test and tooling hooks; none is needed for a normal run."""

    on_model_loaded: Callable[[Task, int, torch.nn.Module], None] | None = None
    """Called with the model as loaded for (task, seed), before any saved state is applied."""
    on_step: Callable[[Task, int, int], None] | None = None
    """Called with (task, seed, step) after each optimizer step and any state save."""


@dataclass
class SeedRun:
    """Everything that defines one finetuning run; its signature guards resumption."""

    task: Task
    seed: int
    hparams: Hparams
    init_dir: Path
    out_dir: Path

    def signature(self, train_examples: int) -> dict[str, Any]:
        return {
            "task": self.task.name,
            "seed": self.seed,
            "hparams": dataclasses.asdict(self.hparams),
            "init": str(self.init_dir),
            "train_examples": train_examples,
        }


def schedule(train_examples: int, hp: Hparams, world_size: int) -> tuple[int, int]:
    """(steps per epoch, total steps). A last partial batch is kept unless it cannot give every
    data-parallel rank an example."""
    if hp.batch_size < world_size:
        raise UserError(f"batch size {hp.batch_size} is smaller than the {world_size} processes")
    full, rest = divmod(train_examples, hp.batch_size)
    per_epoch = full + (1 if rest >= world_size else 0)
    if per_epoch == 0:
        raise UserError(f"{train_examples} training examples cannot fill a batch over {world_size} processes")
    return per_epoch, max(1, round(hp.epochs * per_epoch))


def batch_indices(step: int, per_epoch: int, seed: int, n: int, batch_size: int) -> np.ndarray:
    """The global batch of `step`: a slice of epoch's permutation, drawn from (seed, epoch) alone."""
    epoch, pos = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[pos * batch_size : (pos + 1) * batch_size]


def train_step(
    net: torch.nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_grad_norm: float,
    rt: Runtime,
    graphed: GraphedGlueStep | None = None,
) -> torch.Tensor:
    """One optimizer step on `batch` (CPU tensors): forward + backward, eagerly under the runtime's
    autocast or as `graphed`'s replay, then clipping (max_grad_norm > 0), the optimizer and the
    schedule. Returns the batch's mean loss, a device tensor of its own. No host sync."""
    if graphed is not None:
        loss = graphed(batch).loss.clone()  # the graph's output is overwritten by its next replay
    else:
        with rt.autocast():
            loss = net(**to_device(batch, rt.device)).loss
        loss.backward()
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def make_graphed_step(model: torch.nn.Module, rt: Runtime, pad_id: int) -> GraphedGlueStep:
    """The CUDA-graph step for `model`; UserError (one line) where it cannot run."""
    if rt.device.type != "cuda" or rt.distributed:
        raise UserError("run.cuda_graphs=true runs on one CUDA device (one process)")
    try:
        return GraphedGlueStep(model, pad_id=pad_id)
    except ValueError as err:
        raise UserError(f"run.cuda_graphs=true: {err}") from None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Tokenized, rt: Runtime, batch_size: int, pad_id: int
) -> tuple[np.ndarray, float]:
    """(logits (N, C) float32, mean loss) over a dev split; ranks share it in contiguous shards."""
    was_training = model.training
    model.eval()
    packed = uses_packed_batches(model)
    n = len(data)
    lo, hi = n * rt.rank // rt.world_size, n * (rt.rank + 1) // rt.world_size
    logits, loss_sum = [], 0.0
    for start in range(lo, hi, batch_size):
        idx = np.arange(start, min(start + batch_size, hi))
        with rt.autocast():
            out = model(**to_device(data.batch(idx, packed, pad_id), rt.device))
        logits.append(out.logits.float().cpu().numpy())
        loss_sum += float(out.loss) * len(idx)
    model.train(was_training)
    shards = rt.all_gather((np.concatenate(logits) if logits else None, loss_sum))
    all_logits = np.concatenate([s for s, _ in shards if s is not None])
    return all_logits, sum(l for _, l in shards) / n


def run_seed(
    run: SeedRun,
    tokenizer: Any,
    train: Tokenized,
    evals: dict[str, tuple[str, Tokenized]],
    rt: Runtime,
    *,
    save_every: int = 2000,
    eval_batch_size: int = 128,
    save_model: bool = False,
    hooks: Hooks | None = None,
    progress: Any = None,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Train and evaluate one (task, seed) into run.out_dir, resuming from its state if there is one.

    evals maps each metric suffix to (split name, tokenized dev split). Returns the result dict
    that is also written to result.json. cuda_graphs: the training steps as CUDA-graph replays
    (one CUDA device, one process, a model glue.graphed_step can capture; UserError otherwise).
    """
    hooks = hooks or Hooks()
    task, hp = run.task, run.hparams
    started = time.perf_counter()
    signature = run.signature(len(train))
    per_epoch, total = schedule(len(train), hp, rt.world_size)

    torch.manual_seed(run.seed)  # a re-initialised head is the same on every rank and every resume
    model = load_for_task(run.init_dir, task)
    if hooks.on_model_loaded is not None:
        hooks.on_model_loaded(task, run.seed, model)
    model.to(rt.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, weight_decay=hp.weight_decay / hp.lr
    )
    # warmup, then linear decay to 0 one step after the last update
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupLinearDecay(total, hp.warmup_fraction, 0.0, floor_after_last_step=True)
    )
    torch.manual_seed(run.seed * 1000 + rt.rank)  # dropout differs across ranks

    state_path = run.out_dir / STATE_FILE
    step, resumed_from = 0, None
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["signature"] != signature:
            raise UserError(f"{state_path} was saved by a run with other settings; delete it or use another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = resumed_from = int(state["step"])
        rng = state["rng"]
        if len(rng) == rt.world_size:
            set_rng_state(rng[rt.rank])
        del state

    def save_state() -> None:
        rngs = rt.all_gather(rng_state())
        if rt.is_main:
            atomic_torch_save(
                {
                    "signature": signature,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rngs,
                },
                state_path,
            )
        rt.barrier()

    packed = uses_packed_batches(model)
    pad_id = tokenizer.pad_token_id or 0
    net = (
        DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        if rt.distributed
        else model
    )
    graphed = make_graphed_step(model, rt, pad_id) if cuda_graphs else None
    if progress is not None:
        progress.update(step)
    recent: list[torch.Tensor] = []
    tokens = 0  # this rank's real (non-pad) training tokens since the start or the resume
    lengths = np.diff(train.offsets)
    net.train()
    loop_started = time.perf_counter()
    while step < total:
        idx = batch_indices(step, per_epoch, run.seed, len(train), hp.batch_size)[rt.rank :: rt.world_size]
        tokens += int(lengths[idx].sum())
        batch = train.batch(idx, packed, pad_id)
        loss = train_step(net, batch, optimizer, scheduler, hp.max_grad_norm, rt, graphed)
        step += 1
        recent = (recent + [loss])[-50:]
        if progress is not None:
            progress.update(1)
            if step % 20 == 0 or step == total:
                progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step == total or (save_every > 0 and step % save_every == 0):
            save_state()
        if hooks.on_step is not None:
            hooks.on_step(task, run.seed, step)

    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    del graphed  # its graphs and their memory
    train_seconds = time.perf_counter() - loop_started  # includes the periodic state saves
    tokens = sum(rt.all_gather(tokens))
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_sec = tokens / train_seconds if tokens else None
    metrics: dict[str, float] = {}
    eval_loss: dict[str, float] = {}
    eval_examples: dict[str, int] = {}
    for suffix, (split, data) in evals.items():
        logits, loss_mean = evaluate(model, data, rt, eval_batch_size, pad_id)
        metrics.update(task_metrics(task, suffix, predictions(task, logits), data.labels))
        eval_loss[split], eval_examples[split] = loss_mean, len(data)

    if save_model and rt.is_main:
        with output_folder(run.out_dir / MODEL_DIR, MODEL_KIND) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
    result = {
        "task": task.name,
        "seed": run.seed,
        "metrics": metrics,
        "eval_loss": eval_loss,
        "eval_examples": eval_examples,
        "train_examples": len(train),
        "steps": total,
        "resumed_from_step": resumed_from,
        "world_size": rt.world_size,
        "cuda_graphs": cuda_graphs,
        "train_loss_recent": float(torch.stack(recent).float().mean()) if recent else None,
        "seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "train_tokens": tokens,
        "tokens_per_sec": tokens_per_sec,
        "mfu": None
        if tokens_per_sec is None
        else mfu(paper_flops_per_token(n_params) * tokens_per_sec, rt.world_size, peak_flops(rt.device)),
        "hparams": dataclasses.asdict(hp),
        "init": str(run.init_dir),
    }
    if rt.is_main:
        atomic_write_json(run.out_dir / RESULT_FILE, result)
        state_path.unlink(missing_ok=True)
    rt.barrier()
    return result
