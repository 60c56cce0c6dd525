"""CUDA graphs for the packed MLM training forward and backward: the host issues two replays
instead of ~5000 ops.

At batch 256 x 128 a MosaicBERT-Base step takes the host about as long to issue as the GPU takes
to run it, and on smaller or shorter batches (finetuning-like lengths) the host alone sets the
pace. `use_cuda_graphs(model)` routes the model's training forward on packed MLM batches through
`torch.cuda.make_graphed_callables`: one forward graph and one backward graph per bucket shape,
replayed by an autograd Function, so that `loss.backward()`, DeepSpeed's `engine.backward`,
gradient accumulation and optimizers work unchanged (gradients still reach `.grad` through
autograd). Evaluation, padded batches and anything else run eagerly.

Shapes are made static by bucketing (`pad_packed`): the token count is padded up to the next
multiple of `token_step` with dummy sequences (pad id, label -100), which no real token attends
to; the masked-token count up to a multiple of `mask_step` with positions of a dummy token,
whose label -100 the loss ignores; max_seqlen is rounded up to a power of two. The dummy tokens
carry no loss and send no gradient into real rows, so loss and gradients are those of the
unpadded batch (up to summation order inside the matmuls).

Graph-safe pieces this relies on: the fused kernels read their dropout seeds from device memory
(drawn by torch's CUDA generator, which advances on every replay), and the attention kernel and
the loss never synchronise with the host. All buckets share one memory pool, which is safe as
long as each forward is followed by its backward before the next training forward (the usual
loop; not two forwards and then their backwards).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn as nn

from .model import MosaicBertMaskedLMOutput

IGNORE_INDEX = -100
_GRAPH_KEYS = ("input_ids", "cu_seqlens", "labels", "masked_positions")


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


class _Bucket(nn.Module):
    """The model's packed MLM forward at one bucket shape, tensors in and out (what
    make_graphed_callables takes). Calls the class's forward, so hooks on the model (DeepSpeed's)
    run once per step outside the graph, not inside the capture."""

    def __init__(self, model: nn.Module, max_seqlen: int, autocast_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.max_seqlen, self.autocast_dtype = model, max_seqlen, autocast_dtype

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, labels: torch.Tensor,
                masked_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # autocast as the caller had it, without its weight cache (cached casts must not outlive a capture)
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            out = type(self.model).forward(self.model, input_ids, cu_seqlens=cu_seqlens, max_seqlen=self.max_seqlen,
                                           labels=labels, masked_positions=masked_positions)
        return out.loss, out.logits.detach(), out.masked_labels


class _Graphs:
    """The captured buckets of one model, and the forward that dispatches to them."""

    def __init__(self, model: nn.Module, token_step: int, mask_step: int, pad_id: int) -> None:
        self.model, self.token_step, self.mask_step, self.pad_id = model, token_step, mask_step, pad_id
        self.eager_forward = model.forward
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.pool = torch.cuda.graph_pool_handle()
        self.buckets: dict[tuple, nn.Module] = {}

    def graphable(self, kwargs: dict[str, Any]) -> bool:
        ids = kwargs.get("input_ids")
        return (self.model.training and torch.is_grad_enabled() and ids is not None and ids.dim() == 1 and ids.is_cuda
                and all(kwargs.get(k) is not None for k in _GRAPH_KEYS) and kwargs.get("max_seqlen") is not None
                and kwargs.get("token_type_ids") is None and kwargs.get("attention_mask") is None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args or not self.graphable(kwargs):
            return self.eager_forward(*args, **kwargs)
        batch = pad_packed({k: kwargs[k] for k in (*_GRAPH_KEYS, "max_seqlen")}, self.token_step, self.mask_step,
                           self.pad_id)
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        inputs = tuple(batch[k] for k in _GRAPH_KEYS)
        key = (tuple(t.shape for t in inputs), batch["max_seqlen"], autocast)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = torch.cuda.make_graphed_callables(
                _Bucket(self.model, batch["max_seqlen"], autocast), (tuple(t.clone() for t in inputs),),
                num_warmup_iters=2, allow_unused_input=True, pool=self.pool, capture_error_mode="thread_local")
        # gradients must already exist: autograd could otherwise adopt a graph's static gradient
        # buffer as .grad, which the next replay would overwrite
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        loss, logits, masked_labels = bucket(*inputs)
        return MosaicBertMaskedLMOutput(loss=loss, logits=logits, masked_labels=masked_labels)


def use_cuda_graphs(model: nn.Module, token_step: int = 256, mask_step: int = 256, pad_id: int = 0) -> nn.Module:
    """Route `model`'s training forward on packed MLM batches (on CUDA, with labels and
    masked_positions) through CUDA graphs, one pair per bucket shape captured on first use; the
    model is returned. Other calls (eval, padded input, no labels) run eagerly. The returned
    output's logits and masked_labels are valid until the next training forward."""
    params = [p for p in model.parameters()]
    if not params or not params[0].is_cuda:
        raise ValueError("CUDA graphs need a model on a CUDA device")
    graphs = _Graphs(model, token_step, mask_step, pad_id)
    model.forward = types.MethodType(lambda self, *a, **kw: graphs.forward(*a, **kw), model)
    model._cuda_graphs = graphs
    return model
