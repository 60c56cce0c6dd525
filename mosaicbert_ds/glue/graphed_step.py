"""CUDA graphs for the GLUE finetuning step: forward + backward of a classification batch as one replay.

Finetuning batches are small (16-48 pairs of about 64 tokens), so an eager step is bound by the
host issuing its kernels, as pretraining's small micro batches are (docs/performance.md, "CUDA
graphs" and "Finetuning"). `GraphedGlueStep` is mosaicbert_ds.graphed_mlm_step.GraphedStep with
GLUE's bucketing (`pad_glue`) and a loss that ignores the padding rows (`weighted_loss`); the
optimizer step, clipping and the schedule stay eager (torch AdamW is a few multi-tensor kernels).

Bucketing: a packed GLUE batch (glue.data.Tokenized.batch: input_ids (T,), token_type_ids (T,),
cu_seqlens (B + 1,), max_seqlen, labels (B,)) becomes
  - max_seqlen: the next power of two, at least 16 (graphed_mlm_step.seqlen_bucket);
  - T tokens: `token_bucket(T)`, the next of TOKEN_BUCKETS_PER_OCTAVE evenly spaced sizes per power
    of two above T, in steps of at least MIN_TOKEN_STEP (so at least one and at most max(16, T / 8)
    tokens of padding);
  - B rows: B plus enough dummy rows to hold the extra tokens in sequences of at most
    min(max_seqlen, DUMMY_SEQLEN) tokens, rounded up to a multiple of BATCH_STEP.
The dummy rows come after the real ones and hold the extra tokens (pad id, token type 0): the
last dummy row is never empty and empty ones sit before it, so every row's first-token index (what
the pooler reads) lies inside the batch. A real sequence attends only within itself (cu_seqlens), so the
dummy rows change no real row's hidden states; their loss weight is 0 and every real row's is 1 / B,
so the loss is the mean over the real examples and the gradients are those of the unpadded batch
(up to summation order inside the matmuls).

What a capture needs of the model (`graphs_unsupported` says why not, for a config): MosaicBERT
on the packed stream (unpad) with the Triton attention kernel (no attention dropout, head size 32,
64 or 128), which never synchronises with the host. Dropout draws fresh masks at every replay:
the fused kernels read their seeds from device memory, drawn by torch's CUDA generator, and the
embeddings' and the classification head's nn.Dropout use that generator, whose offset a replay
advances. One process only: under DDP the gradient all-reduce runs from autograd hooks, which a
capture does not hold, so several processes stay eager.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from ..graphed_mlm_step import DUMMY_SEQLEN, GraphedStep, _round_up, seqlen_bucket

TOKEN_BUCKETS_PER_OCTAVE = 8
"""Token-count buckets per power of two: [2^k, 2^(k+1)) is cut into this many equal steps."""
MIN_TOKEN_STEP = 16
"""The smallest token step (below 256 tokens every bucket is 16 wide)."""
BATCH_STEP = 8
"""Rows (real + dummy) are a multiple of this."""

_ATTENTION_HEAD_SIZES = (32, 64, 128)  # the Triton attention kernel's (attention._triton_available)


def token_bucket(n: int, per_octave: int = TOKEN_BUCKETS_PER_OCTAVE, min_step: int = MIN_TOKEN_STEP) -> int:
    """The padded token count of a batch of n tokens: the smallest multiple of
    max(min_step, 2^floor(log2 n) / per_octave) above n (always at least one token more)."""
    return _round_up(n + 1, token_step(n, per_octave, min_step))


def token_step(n: int, per_octave: int = TOKEN_BUCKETS_PER_OCTAVE, min_step: int = MIN_TOKEN_STEP) -> int:
    """The bucket width at n tokens (token_bucket's step)."""
    return max(min_step, (1 << max(0, n.bit_length() - 1)) // per_octave)


def pad_glue(
    batch: dict[str, Any],
    pad_id: int = 0,
    per_octave: int = TOKEN_BUCKETS_PER_OCTAVE,
    batch_step: int = BATCH_STEP,
    min_step: int = MIN_TOKEN_STEP,
) -> dict[str, Any]:
    """A packed GLUE batch at its bucket's static shapes (module docstring), with `loss_weights`
    (rows,) float32 added: 1 / B for each real row, 0 for each dummy row. CPU or device tensors,
    no host sync; the real rows and tokens come first, unchanged."""
    ids, cu, labels = batch["input_ids"], batch["cu_seqlens"], batch["labels"]
    if ids.dim() != 1 or labels.dim() != 1 or cu.numel() != labels.numel() + 1:
        raise ValueError("pad_glue needs a packed GLUE batch: input_ids (T,), cu_seqlens (B + 1,), labels (B,)")
    total, rows = ids.numel(), labels.numel()
    max_seqlen = seqlen_bucket(batch["max_seqlen"])
    step = token_step(total, per_octave, min_step)
    padded_total = _round_up(total + 1, step)
    dummy_len = min(max_seqlen, DUMMY_SEQLEN)
    needed = -(-step // dummy_len)  # dummy rows that can hold up to `step` extra tokens
    n_dummy = _round_up(rows + needed, batch_step) - rows
    # dummy row j (0 .. n_dummy - 1) ends at max(total, padded_total - (n_dummy - 1 - j) * dummy_len):
    # full rows at the end, empty ones (starting at `total`, the first dummy token) before them
    back = torch.arange(n_dummy - 1, -1, -1, device=cu.device, dtype=cu.dtype)
    ends = (padded_total - back * dummy_len).clamp_(min=total)
    extra = padded_total - total
    out = dict(batch)
    out["input_ids"] = torch.cat([ids, ids.new_full((extra,), pad_id)])
    if batch.get("token_type_ids") is not None:
        out["token_type_ids"] = torch.cat([batch["token_type_ids"], batch["token_type_ids"].new_zeros(extra)])
    out["cu_seqlens"] = torch.cat([cu, ends])
    out["max_seqlen"] = max_seqlen
    out["labels"] = torch.cat([labels, labels.new_zeros(n_dummy)])
    out["loss_weights"] = torch.cat(
        [torch.full((rows,), 1.0 / rows, device=labels.device), torch.zeros(n_dummy, device=labels.device)]
    )
    return out


def problem_type(model: torch.nn.Module) -> str:
    """The model's loss: regression or single_label_classification, decided as the model decides it."""
    config = model.config
    kind = config.problem_type or ("regression" if config.num_labels == 1 else "single_label_classification")
    if kind not in ("regression", "single_label_classification"):
        raise ValueError(f"the graphed GLUE step supports regression and single-label classification, not {kind}")
    return kind


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, kind: str) -> torch.Tensor:
    """sum_i weights[i] * loss_i, each row's loss as MosaicBertForSequenceClassification computes it
    (MSE on the squeezed logit for regression, cross-entropy otherwise, both in fp32)."""
    if kind == "regression":
        per_row = F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none")
    else:
        per_row = F.cross_entropy(logits.float(), labels.long(), reduction="none")
    return (per_row * weights).sum()


def graphs_unsupported(config: Any) -> str | None:
    """Why a capture cannot hold this model's training step (None when it can): it needs MosaicBERT
    on the packed stream with the Triton attention kernel, which never waits for the host."""
    model_type = getattr(config, "model_type", None)
    if model_type != "mosaicbert":
        return f"it needs a MosaicBERT model (this one is {model_type!r}, run on padded batches)"
    if not getattr(config, "unpad", True):
        return "it needs a model run on the packed token stream (unpad: true)"
    if getattr(config, "attention_impl", "auto") == "torch":
        return "attention_impl=torch runs the reference attention, which waits for the host"
    if getattr(config, "attention_probs_dropout_prob", 0.0):
        return "the Triton attention kernel has no dropout (attention_probs_dropout_prob must be 0)"
    head = config.hidden_size // config.num_attention_heads
    if head not in _ATTENTION_HEAD_SIZES:
        return f"the Triton attention kernel takes head sizes 32, 64 or 128, not {head}"
    return None


class GraphedGlueStep(GraphedStep):
    """Forward + backward of a packed GLUE batch (classification or regression head) as a replay.

    step(batch) has the effect of `model(**batch).loss.backward()` on the unpadded batch (the mean
    loss over its examples) and returns a SequenceClassifierOutput whose loss is that mean and
    whose logits hold the padded rows (the real ones first), valid until the next call. The batch
    may be on the CPU: it is padded there and copied into the graph's inputs. With
    accumulate=False (the default, an optimizer step after every batch) each call's gradients
    replace the last ones (GraphedStep)."""

    def __init__(
        self,
        model: torch.nn.Module,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        pad_id: int = 0,
        accumulate: bool = False,
    ) -> None:
        if (why := graphs_unsupported(model.config)) is not None:
            raise ValueError(f"CUDA graphs cannot capture this model: {why}")
        from ..ops import triton_kernels

        if triton_kernels() is None:
            raise ValueError("CUDA graphs need the Triton kernels (is Triton installed?)")
        self.kind, self.pad_id = problem_type(model), pad_id
        super().__init__(model, self._pad, autocast_dtype, self._forward, accumulate)

    def _pad(self, batch: dict[str, Any]) -> dict[str, Any]:
        return pad_glue(batch, self.pad_id)

    def _forward(self, labels: torch.Tensor, loss_weights: torch.Tensor, **inputs: Any) -> SequenceClassifierOutput:
        logits = self.model(**inputs).logits
        return SequenceClassifierOutput(loss=weighted_loss(logits, labels, loss_weights, self.kind), logits=logits)
