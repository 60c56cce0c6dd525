"""CUDA graphs for the packed MLM training step: the host issues one replay instead of ~5000 ops.

At batch 256 x 128 a MosaicBERT-Base step takes the host about as long to issue as the GPU takes
to run it, and on shorter batches (finetuning-like lengths) the host alone sets the pace.
`GraphedMLMStep` captures forward + backward once per batch shape and replays it.

Shapes are made static by bucketing (`pad_packed`): the token count is padded up to the next
multiple of `token_step` with dummy sequences (pad id, label -100), which no real token attends
to; the masked-token count up to a multiple of `mask_step` with positions of a dummy token,
whose label -100 the loss ignores; max_seqlen is rounded up to a power of two. The dummy tokens
carry no loss and send no gradient into real rows, so loss and gradients are those of the
unpadded batch (up to summation order inside the matmuls).

Graph-safe pieces this relies on: the fused kernels read their dropout seeds from device memory
(drawn by torch's CUDA generator, which advances on every replay), the attention kernel and the
loss never synchronise with the host, and gradients accumulate in place into `.grad` tensors
allocated before capture.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def pad_packed(batch: dict[str, Any], token_step: int = 256, mask_step: int = 256, pad_id: int = 0
               ) -> dict[str, Any]:
    """A packed MLM batch (input_ids (T,), cu_seqlens (B+1,), max_seqlen, labels (T,),
    masked_positions (M,), optional token_type_ids (T,)) padded to static bucket shapes.

    T grows to the next multiple of token_step above T (at least one dummy token, which the padded
    masked positions point at), split into ceil(token_step / max_seqlen) dummy sequences (some of
    length 0); M grows to a multiple of mask_step; max_seqlen becomes a power of two (>= 16).
    Works on CPU or device tensors without a host sync."""
    ids, cu, positions = batch["input_ids"], batch["cu_seqlens"], batch["masked_positions"]
    if ids.dim() != 1 or "labels" not in batch:
        raise ValueError("pad_packed needs a packed MLM batch: input_ids (T,), cu_seqlens, labels, masked_positions")
    total, n_masked = ids.numel(), positions.numel()
    max_seqlen = max(16, 1 << (max(1, int(batch["max_seqlen"])) - 1).bit_length())
    extra = _round_up(total + 1, token_step) - total
    n_dummy = -(-token_step // max_seqlen)
    # dummy sequence i ends at min((i + 1) * max_seqlen, extra): made on the device (a host-to-device
    # copy of a CPU tensor would wait for the GPU to drain)
    ends = (torch.arange(1, n_dummy + 1, device=cu.device, dtype=cu.dtype) * max_seqlen).clamp_(max=extra)
    out = dict(batch)
    out["input_ids"] = torch.cat([ids, ids.new_full((extra,), pad_id)])
    out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((extra,), IGNORE_INDEX)])
    if batch.get("token_type_ids") is not None:
        out["token_type_ids"] = torch.cat([batch["token_type_ids"], batch["token_type_ids"].new_zeros(extra)])
    out["cu_seqlens"] = torch.cat([cu, cu[-1:] + ends])
    out["masked_positions"] = torch.cat([positions, positions.new_full((_round_up(n_masked, mask_step) - n_masked,),
                                                                       total)])
    out["max_seqlen"] = max_seqlen
    return out


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: Any


class GraphedMLMStep:
    """Forward + backward of a packed MLM batch as one CUDA-graph replay per bucket shape.

    step(batch, grad_scale) has the effect of `(model(**batch).loss * grad_scale).backward()`:
    gradients accumulate into the parameters' `.grad`, which this class allocates (zeros) and the
    graphs write into. Zero them with `optimizer.zero_grad(set_to_none=False)`; replacing a
    `.grad` tensor would leave the graphs writing into a stale one, so that is checked and refused.
    The returned model output (loss, logits, masked_labels) is valid until the next call.
    Each new bucket costs a warm-up (kernel compilation and tuning, outside the graph, through
    torch.autograd.grad so that `.grad` is untouched) and a capture, once. Drop references to eager
    losses or outputs from before the first call: their autograd graph keeps each parameter's
    gradient-accumulation node bound to the stream it ran on, which invalidates the capture.
    """

    def __init__(self, model: torch.nn.Module, token_step: int = 256, mask_step: int = 256,
                 autocast_dtype: torch.dtype | None = None, pad_id: int = 0) -> None:
        self.model = model
        self.token_step, self.mask_step, self.pad_id = token_step, mask_step, pad_id
        self.autocast_dtype = autocast_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params or not self.params[0].is_cuda:
            raise ValueError("CUDA graphs need a model on a CUDA device")
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        self.scale = torch.ones((), device=self.params[0].device)
        self._scale_value = 1.0
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Captured] = {}

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # the autocast weight cache must not outlive a capture
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _forward_backward(self, inputs: dict[str, Any], accumulate: bool) -> Any:
        with self._autocast():
            out = self.model(**inputs)
        loss = out.loss * self.scale
        if accumulate:
            loss.backward()
        else:
            torch.autograd.grad(loss, self.params, allow_unused=True)
        return out

    def _capture(self, batch: dict[str, Any]) -> _Captured:
        device = self.params[0].device
        inputs = {k: v.to(device, copy=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward_backward(inputs, accumulate=False)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = self._forward_backward(inputs, accumulate=True)
        # detached: a kept autograd graph would pin its gradient-accumulation nodes to this capture
        output = type(output)(**{k: v.detach() if torch.is_tensor(v) else v for k, v in output.items()})
        return _Captured(graph, {k: v for k, v in inputs.items() if torch.is_tensor(v)}, output)

    def __call__(self, batch: dict[str, Any], grad_scale: float = 1.0) -> Any:
        if any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise RuntimeError("a parameter's .grad was replaced or set to None; with CUDA graphs zero the "
                               "gradients in place (optimizer.zero_grad(set_to_none=False))")
        if not self.model.training:
            raise RuntimeError("GraphedMLMStep captures training steps; call model.train() first")
        padded = pad_packed(batch, self.token_step, self.mask_step, self.pad_id)
        key = tuple((k, tuple(v.shape)) if torch.is_tensor(v) else (k, v) for k, v in sorted(padded.items()))
        if grad_scale != self._scale_value:
            self.scale.fill_(grad_scale)
            self._scale_value = grad_scale
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(padded)
        else:
            for name, static in captured.inputs.items():
                static.copy_(padded[name], non_blocking=True)
        captured.graph.replay()
        return captured.output
