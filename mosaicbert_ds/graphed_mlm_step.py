"""CUDA graphs for the packed MLM training step: the host issues one replay instead of every op.

An eager step is as fast as the host issues its kernels; graphs pay where the host is the limit
(small micro batches, short sequences). Measurements: docs/performance.md, "CUDA graphs".
`GraphedStep` captures forward + backward once per batch shape and replays it; what it pads a
batch to (the bucketing) and how it calls the model are its parameters. `GraphedMLMStep` is it
for packed MLM batches; mosaicbert_ds.glue.graphed_step for GLUE's classification batches.

Shapes are made static by bucketing (`pad_packed`): the token count is padded up to the next
multiple of `token_step` with dummy sequences (pad id, label -100) of at most DUMMY_SEQLEN
tokens each (their attention cost stays small at any max_seqlen), which no real token attends
to; the masked-token count up to a multiple of `mask_step` with positions of a dummy token,
whose label -100 the loss ignores; max_seqlen is rounded up to a power of two, the attention
kernel's own tuning bucket, so sequences up to any length share a graph per power of two. The dummy tokens
carry no loss and send no gradient into real rows, so loss and gradients are those of the
unpadded batch (up to summation order inside the matmuls).

Graph-safe pieces this relies on: the fused kernels read their dropout seeds from device memory
(drawn by torch's CUDA generator, which advances on every replay), the attention kernel and the
loss never synchronise with the host, and gradients either accumulate in place into `.grad`
tensors allocated before capture or (accumulate=False) are the graph's own output tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call uses

from .batch import IGNORE_INDEX, PackedBatch

DUMMY_SEQLEN = 256
"""Longest dummy sequence pad_packed adds (fewer when max_seqlen is shorter)."""


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def seqlen_bucket(max_seqlen: int) -> int:
    """The attention kernel's tuning bucket for a batch's longest sequence: the next power of two,
    at least 16. Graphs are keyed by it, so sequences up to any length share one per power of two."""
    return max(16, 1 << (max(1, int(max_seqlen)) - 1).bit_length())


def pad_packed(batch: PackedBatch, token_step: int = 256, mask_step: int = 256, pad_id: int = 0) -> PackedBatch:
    """A PackedBatch (mosaicbert_ds.batch) padded to static bucket shapes.

    T grows to the next multiple of token_step above T (at least one dummy token, which the padded
    masked positions point at), split into ceil(token_step / min(max_seqlen, DUMMY_SEQLEN)) dummy
    sequences (some of length 0); M grows to a multiple of mask_step; max_seqlen becomes a power of
    two (>= 16). A "samples" count (packed rows) is left out: it is no shape. Works on CPU or
    device tensors without a host sync."""
    ids, cu, positions = batch["input_ids"], batch["cu_seqlens"], batch["masked_positions"]
    if ids.dim() != 1 or "labels" not in batch:
        raise ValueError("pad_packed needs a packed MLM batch: input_ids (T,), cu_seqlens, labels, masked_positions")
    total, n_masked = ids.numel(), positions.numel()
    max_seqlen = seqlen_bucket(batch["max_seqlen"])
    extra = _round_up(total + 1, token_step) - total
    dummy = min(max_seqlen, DUMMY_SEQLEN)
    n_dummy = -(-token_step // dummy)
    # dummy sequence i ends at min((i + 1) * dummy, extra): made on the device (a host-to-device
    # copy of a CPU tensor would wait for the GPU to drain)
    ends = (torch.arange(1, n_dummy + 1, device=cu.device, dtype=cu.dtype) * dummy).clamp_(max=extra)
    out = dict(batch)
    out.pop("samples", None)
    out["input_ids"] = torch.cat([ids, ids.new_full((extra,), pad_id)])
    out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((extra,), IGNORE_INDEX)])
    if batch.get("token_type_ids") is not None:
        out["token_type_ids"] = torch.cat([batch["token_type_ids"], batch["token_type_ids"].new_zeros(extra)])
    out["cu_seqlens"] = torch.cat([cu, cu[-1:] + ends])
    out["masked_positions"] = torch.cat(
        [positions, positions.new_full((_round_up(n_masked, mask_step) - n_masked,), total)]
    )
    out["max_seqlen"] = max_seqlen
    return out


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: Any
    grads: list[torch.Tensor | None] | None  # the graph's gradient outputs (accumulate=False)
    used: tuple[bool, ...]  # which parameters receive a gradient


class GraphedStep:
    """Forward + backward of a batch as one CUDA-graph replay per bucket shape.

    `pad(batch)` gives the batch at its bucket's static shapes (a dict of tensors and plain
    values; the graph is keyed by the tensors' shapes and the plain values), and
    `forward(**padded)` returns a model output whose `.loss` is the padded batch's loss; by
    default `forward` is the model itself. Both are the caller's: the bucketing must leave the
    loss and its gradients those of the unpadded batch.

    step(batch, grad_scale) has the effect of `(forward(**pad(batch)).loss * grad_scale).backward()`
    (grad_scale a number or a one-element tensor):
    gradients accumulate into the parameters' `.grad`, which this class allocates (zeros) and the
    graphs write into. Zero them with `optimizer.zero_grad(set_to_none=False)`; replacing a
    `.grad` tensor would leave the graphs writing into a stale one, so that is checked and refused.
    With accumulate=False each call's gradients replace the last ones instead: every parameter's
    `.grad` becomes the graph's own output tensor, valid until the next call, with no add and no
    zeroing (docs/performance.md gives what that saves). That suits an optimizer step after
    every call. Each bucket then keeps its own gradient tensors (the parameters' size once more per
    bucket). With accumulate=[targets] (one tensor or None per trainable parameter, in
    `named_parameters` order) the graph adds each gradient into its target instead, inside the
    replay (one multi-tensor add, any target dtype: fp32 += bf16 promotes in the kernel): an
    optimizer's own accumulation buffers, such as DeepSpeed's fp32 ones, with no host work per
    parameter and no gradient tensors kept per bucket. `.grad` is left alone.
    The returned model output is valid until the next call (its tensors are the graph's).
    Each new bucket costs a warm-up (kernel compilation and tuning, outside the graph; `.grad` is
    untouched) and a capture, once; neither draws from the run's random stream. `forward` may
    leave out module hooks that cannot run in a capture (e.g. `model.forward`); it must call
    `model`'s modules, whose parameters are swapped for aliases during the call.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pad: Callable[[dict[str, Any]], dict[str, Any]],
        autocast_dtype: torch.dtype | None = None,
        forward: Callable[..., Any] | None = None,
        accumulate: bool | list[torch.Tensor | None] = True,
    ) -> None:
        self.model, self.pad = model, pad
        self.forward = forward or model
        self.autocast_dtype, self.accumulate = autocast_dtype, accumulate
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        if not self.params or not self.params[0].is_cuda:
            raise ValueError("CUDA graphs need a model on a CUDA device")
        self.targets: list[torch.Tensor | None] | None = None  # where the graph adds gradients
        if isinstance(accumulate, list):
            if len(accumulate) != len(self.params):
                raise ValueError(f"accumulate: {len(accumulate)} targets for {len(self.params)} parameters")
            self.targets = accumulate
        elif accumulate:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.targets = [p.grad for p in self.params]
        self.grads = [p.grad for p in self.params] if accumulate is True else []
        self.scale = torch.ones((), device=self.params[0].device)
        self._scale_value = 1.0
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Captured] = {}

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # the autocast weight cache must not outlive a capture
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _forward_backward(self, inputs: dict[str, Any]) -> tuple[Any, tuple[torch.Tensor | None, ...]]:
        # The model runs on fresh leaf aliases of its parameters (same storage). A parameter's own
        # gradient-accumulation node lives as long as anything references it and stays bound to the
        # stream it was made on; under DeepSpeed's engine that was the legacy default stream, and
        # the backward's hand-over of gradients to it invalidated the capture. An alias's node is
        # made here, on the capturing stream.
        aliases = [p.detach().requires_grad_() for p in self.params]
        with self._autocast(), _reparametrize_module(self.model, dict(zip(self.names, aliases)), tie_weights=True):
            out = self.forward(**inputs)
        loss = out.loss * self.scale
        return out, torch.autograd.grad(loss, aliases, allow_unused=True)

    def _hand_over(self, grads: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None] | None:
        """Inside the capture: add the gradients into their targets (one foreach add), or keep them as
        the graph's outputs, laid out as their parameters (what optimizers expect of a .grad)."""
        if self.targets is not None:
            used = [(t, g) for t, g in zip(self.targets, grads) if g is not None and t is not None]
            torch._foreach_add_([t for t, _ in used], [g.reshape(t.shape) for t, g in used])
            return None
        return [
            g if g is None or g.stride() == p.stride() else torch.empty_like(p).copy_(g)
            for p, g in zip(self.params, grads)
        ]

    def _capture(self, batch: dict[str, Any]) -> _Captured:
        device = self.params[0].device
        inputs = {k: v.to(device, copy=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        # warm-up and capture draw no random numbers from the run's stream: the dropout masks of a
        # step depend on the generator state alone, not on when each bucket was first seen (so a
        # resumed run replays the uninterrupted run's masks)
        with torch.random.fork_rng(devices=[device]):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward_backward(inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output, grads = self._forward_backward(inputs)
                kept = self._hand_over(grads)
        used = tuple(g is not None for g in grads)
        # detached: a kept autograd graph would pin its gradient-accumulation nodes to this capture
        output = type(output)(**{k: v.detach() if torch.is_tensor(v) else v for k, v in output.items()})
        return _Captured(graph, {k: v for k, v in inputs.items() if torch.is_tensor(v)}, output, kept, used)

    def __call__(self, batch: dict[str, Any], grad_scale: float | torch.Tensor = 1.0) -> Any:
        if self.accumulate is True and any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise RuntimeError(
                "a parameter's .grad was replaced or set to None; with CUDA graphs zero the "
                "gradients in place (optimizer.zero_grad(set_to_none=False))"
            )
        if not self.model.training:
            raise RuntimeError(f"{type(self).__name__} captures training steps; call model.train() first")
        padded = self.pad(batch)
        key = tuple((k, tuple(v.shape)) if torch.is_tensor(v) else (k, v) for k, v in sorted(padded.items()))
        if torch.is_tensor(grad_scale):  # e.g. computed on the device from an all-reduced count
            self.scale.copy_(grad_scale.reshape(()), non_blocking=True)
            self._scale_value = None
        elif grad_scale != self._scale_value:
            self.scale.fill_(grad_scale)
            self._scale_value = grad_scale
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(padded)
        else:
            for name, static in captured.inputs.items():
                static.copy_(padded[name], non_blocking=True)
        captured.graph.replay()
        self.used = captured.used
        if captured.grads is not None:
            for p, g in zip(self.params, captured.grads):
                p.grad = g
        return captured.output


class GraphedMLMStep(GraphedStep):
    """GraphedStep for packed MLM batches (mosaicbert_ds.batch.PackedBatch), bucketed by
    `pad_packed(batch, token_step, mask_step, pad_id)`; the output is the model's (loss, logits,
    masked_labels)."""

    def __init__(
        self,
        model: torch.nn.Module,
        token_step: int = 256,
        mask_step: int = 256,
        autocast_dtype: torch.dtype | None = None,
        pad_id: int = 0,
        forward: Callable[..., Any] | None = None,
        accumulate: bool | list[torch.Tensor | None] = True,
    ) -> None:
        self.token_step, self.mask_step, self.pad_id = token_step, mask_step, pad_id
        super().__init__(model, self._pad, autocast_dtype, forward, accumulate)

    def _pad(self, batch: PackedBatch) -> PackedBatch:
        return pad_packed(batch, self.token_step, self.mask_step, self.pad_id)
