"""CUDA graphs inside the DeepSpeed trainer (run option `cuda_graphs: true`).

With the eager step the host issues ~5000 operations per micro batch, and DeepSpeed's own host
work (hooks, bookkeeping, the optimizer's Python) comes on top: at micro batch 256 the host is
about as busy as the GPU, so every millisecond of it costs tokens/s. Here the model's forward and
backward are one CUDA-graph replay (mosaicbert_ds.graphs.GraphedMLMStep), and DeepSpeed keeps
everything around it: gradient accumulation in fp32, the all-reduce at accumulation boundaries,
clipping, the optimizer step, the learning-rate schedule, checkpoints.

The micro step does what `engine(**batch)` + `engine.backward(loss)` do for BF16_Optimizer (the
precision path of bf16 with ZeRO stage 1 and fp32 gradient accumulation), minus the autograd call:
    replay forward + backward          (loss scaled by 1 / accumulation, as engine.backward does);
                                       each bf16 .grad is then the graph's own gradient output, so
                                       nothing needs zeroing first (BF16_Optimizer.backward_prologue)
    fp32 += bf16 gradients             (BF16_Optimizer.backward_epilogue)
    all-reduce at the boundary         (engine.allreduce_gradients)
and `engine.step()` runs unchanged, DeepSpeed's `zero_grad(set_to_none=True)` included. The two
calls into DeepSpeed's internals are in train.deepspeed_internals (`graphed_backward_epilogue`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..batch import PackedBatch
from ..errors import UserError
from ..graphs import GraphedMLMStep
from .deepspeed_internals import check_graphable, graphed_backward_epilogue


class GraphedEngineStep:
    """Forward + backward of one packed micro batch through a DeepSpeed engine, as a graph replay."""

    def __init__(self, engine: Any, token_step: int = 256, mask_step: int = 256) -> None:
        if engine.device.type != "cuda":
            raise UserError("cuda_graphs needs a CUDA device")
        if (why := check_graphable(engine)) is not None:
            raise UserError(why)
        self.engine = engine
        # the module's own forward, without the hooks DeepSpeed hangs on it: its throughput timer
        # synchronises the device (by default), which is illegal inside a capture
        self.step = GraphedMLMStep(
            engine.module, token_step, mask_step, forward=engine.module.forward, accumulate=False
        )

    def __call__(self, batch: PackedBatch, loss_scale: float | torch.Tensor) -> Any:
        """`engine.backward(engine(**batch).loss * loss_scale)`; returns the model output (valid until
        the next call)."""
        engine = self.engine
        out = self.step(batch, grad_scale=loss_scale / engine.gradient_accumulation_steps())
        graphed_backward_epilogue(engine)  # fp32 accumulation, all-reduce at boundaries
        return out
