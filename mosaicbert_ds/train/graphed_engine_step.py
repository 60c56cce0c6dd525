"""CUDA graphs inside the DeepSpeed trainer (the default where they apply; run option `cuda_graphs`).

With the eager step the host issues ~5000 operations per micro batch, and DeepSpeed's own host
work (hooks, bookkeeping, the optimizer's Python) comes on top: at micro batch 256 the host is
about as busy as the GPU, and every smaller micro batch is bound by the host. Here the model's
forward, backward and the fp32 gradient accumulation are one CUDA-graph replay
(mosaicbert_ds.graphed_mlm_step.GraphedMLMStep), and DeepSpeed keeps everything around it: the all-reduce
at accumulation boundaries, clipping, the optimizer step, the learning-rate schedule, checkpoints.

The micro step does what `engine(**batch)` + `engine.backward(loss)` do for BF16_Optimizer (the
precision path of bf16 with ZeRO stage 1 and fp32 gradient accumulation), minus the autograd call
and the per-parameter Python loop:
    replay forward + backward          (loss scaled by 1 / accumulation, as engine.backward does)
    fp32 += bf16 gradients             inside the replay, one multi-tensor add into BF16_Optimizer's
                                       own buffers (its backward_epilogue adds per parameter)
    bookkeeping and all-reduce         which buffers hold gradients; the all-reduce at boundaries
and `engine.step()` runs unchanged, DeepSpeed's `zero_grad` included (the bf16 `.grad` stay
None: no bf16 gradient outlives the replay). The calls into DeepSpeed's internals are in
train.deepspeed_internals (`fp32_gradient_buffers`, `graphed_backward_epilogue`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..batch import PackedBatch
from ..errors import UserError
from ..graphed_mlm_step import GraphedMLMStep
from .deepspeed_internals import check_graphable, fp32_gradient_buffers, graphed_backward_epilogue


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
        params = [p for p in engine.module.parameters() if p.requires_grad]
        self.step = GraphedMLMStep(
            engine.module,
            token_step,
            mask_step,
            forward=engine.module.forward,
            accumulate=fp32_gradient_buffers(engine, params),
        )

    def __call__(self, batch: PackedBatch, loss_scale: float | torch.Tensor) -> Any:
        """`engine.backward(engine(**batch).loss * loss_scale)`; returns the model output (valid until
        the next call)."""
        engine = self.engine
        out = self.step(batch, grad_scale=loss_scale / engine.gradient_accumulation_steps())
        graphed_backward_epilogue(engine, self.step.used)  # bookkeeping, all-reduce at boundaries
        return out
