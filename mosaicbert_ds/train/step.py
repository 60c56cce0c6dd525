"""One optimizer step of the trainer: accumulation over micro batches, each a forward + backward.

`train_step` takes the step's micro batches from the loader (CPU tensors: their sizes are known
without waiting for the GPU): `accum` of them, or, with token budgets (batch.micro_tokens), the
list the loader made of this rank's share of the step, whose length varies per step and per rank.
It weights each micro batch's loss so that the step's gradient is that of the mean over every
masked token of the global batch, marks the accumulation boundary at this rank's last micro
batch (`engine.set_gradient_accumulation_boundary`, so DeepSpeed all-reduces and steps the
optimizer there, whatever its own micro-step count says) and calls `engine.step()` after each
one. `forward_backward` runs one micro batch, eagerly or as a CUDA-graph replay
(train.graphed_engine_step). Sums for the log interval stay on the device in a `Window`, so no micro step
waits for the GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..batch import MLMBatch, is_packed, to_device
from ..config import MosaicBertConfig
from ..flops import training_flops
from .graphed_engine_step import GraphedEngineStep


class Window:
    """Per-log-interval sums: the loss and accuracy on the device, the counts on the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=self.device, dtype=torch.float64)
        self.micro = 0
        self.steps = 0
        self.masked = 0
        self.tokens = 0
        self.samples = 0
        self.flops = 0.0
        self.start = time.perf_counter()

    def add(self, n_seq: int, n_tok: int, n_masked: int, flops: float) -> None:
        self.samples += n_seq
        self.tokens += n_tok
        self.masked += n_masked
        self.micro += 1
        self.flops += flops

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (eval, checkpoint) out of the interval's training time."""
        self.start += seconds


def batch_stats(batch: MLMBatch) -> tuple[int, int, int, list[int]]:
    """(stored samples, real tokens, masked tokens, sequence lengths), read from CPU tensors. A
    packed row (convert --pack) is one sample of several sequences."""
    if is_packed(batch):
        cu = batch["cu_seqlens"]
        lens = (cu[1:] - cu[:-1]).tolist()
        return batch.get("samples", len(lens)), batch["input_ids"].numel(), batch["masked_positions"].numel(), lens
    lens = batch["attention_mask"].sum(1).tolist()
    return batch.get("samples", len(lens)), sum(lens), batch["masked_positions"].numel(), lens


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
    backward are one CUDA-graph replay (train.graphed_engine_step)."""
    if graphed is not None:
        out = graphed(batch, n_masked * weight)
    else:
        out = engine(**batch)
        engine.backward(out.loss * (n_masked * weight))
    loss = out.loss.detach().double() * n_masked
    window.loss += loss
    window.correct += (out.logits.detach().argmax(-1) == out.masked_labels).sum().double()
    return loss


def loss_weight(engine: Any, local_masked: int, accum: int, world: int) -> torch.Tensor | float:
    """The factor that turns DeepSpeed's mean over ranks and accumulation steps into the mean over
    every masked token of the global batch. With several ranks the global count is summed on the
    device from pinned memory: no host sync."""
    if not (dist.is_initialized() and world > 1):
        return accum / local_masked
    masked = torch.tensor([float(local_masked)])
    if engine.device.type == "cuda":
        masked = masked.pin_memory()
    masked = masked.to(engine.device, non_blocking=True)
    dist.all_reduce(masked)
    return (world * accum) / masked


def train_step(
    engine: Any,
    batches: Iterator[dict[str, Any]],
    accum: int,
    world: int,
    window: Window,
    config: MosaicBertConfig,
    graphed: GraphedEngineStep | None = None,
) -> torch.Tensor:
    """One optimizer step; returns this rank's summed masked-token loss of the step (on the device).
    `accum` is DeepSpeed's gradient_accumulation_steps (1 with token budgets)."""
    first = next(batches)
    group = first if isinstance(first, list) else [first, *(next(batches) for _ in range(accum - 1))]
    stats = [batch_stats(batch) for batch in group]
    weight = loss_weight(engine, sum(s[2] for s in stats), accum, world)
    step_loss = torch.zeros((), device=engine.device, dtype=torch.float64)
    for i, (batch, (n_seq, n_tok, n_masked, lens)) in enumerate(zip(group, stats)):
        window.add(n_seq, n_tok, n_masked, training_flops(config, lens, n_masked))
        engine.set_gradient_accumulation_boundary(i == len(group) - 1)
        step_loss += forward_backward(engine, to_device(batch, engine.device), n_masked, weight, window, graphed)
        engine.step()
    window.steps += 1
    return step_loss
