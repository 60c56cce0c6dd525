"""Batches sized in tokens: `batch.global_tokens` and `batch.micro_tokens` (docs/long_context.md).

An optimizer step is always a whole number of samples, the next `global_batch` samples of the
epoch's order, so the data position, resume and world-size independence work as with batches
sized in samples (data.dataset). What the token settings change:

- `batch.global_tokens` picks `global_batch` when the run is planned: the multiple of
  GLOBAL_MULTIPLE samples closest to global_tokens / (the train split's mean sample length,
  from the dataset index). A step then holds global_tokens tokens on average; with packed rows
  (`convert --pack`) or long documents cut by --split-long nearly exactly.
- `batch.micro_tokens` replaces the micro batch in samples: each rank reads its share of a step
  (global_batch / ranks samples) at once and splits it into micro batches of whole samples of at
  most micro_tokens tokens (data.collator.split_by_tokens). DeepSpeed is configured with that
  share as its micro batch and an accumulation of 1; the trainer marks the accumulation boundary
  itself at each rank's last micro batch (train.step), so the number of micro batches may differ
  per step and per rank. Every rank then all-reduces its gradients once per step; ZeRO stage 2,
  which reduces gradients at every micro batch, would need equal counts and is refused on
  several ranks.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError

GLOBAL_MULTIPLE = 64
"""global_tokens rounds the global batch to a multiple of this many samples: the same global
batch on every world size that divides it (1 to 64 ranks, powers of two)."""


def mean_sample_tokens(info: dict[str, Any], split: str = "train") -> float:
    """Mean tokens per stored sample of a split, from the dataset index."""
    entry = info["splits"][split]
    return entry["tokens"] / max(entry["samples"], 1)


def global_batch_for_tokens(global_tokens: int, mean_tokens: float) -> int:
    """The multiple of GLOBAL_MULTIPLE samples closest to global_tokens at mean_tokens per sample."""
    return max(GLOBAL_MULTIPLE, round(global_tokens / mean_tokens / GLOBAL_MULTIPLE) * GLOBAL_MULTIPLE)


def token_micro_batches(ds_config: dict[str, Any], world: int, zero_stage: int) -> None:
    """Set DeepSpeed's batch keys for micro_tokens: the rank's share of a step as one micro batch,
    accumulation 1 (the trainer marks the boundary itself). UserError where that cannot run."""
    global_batch = int(ds_config["train_batch_size"])
    if global_batch % world:
        raise UserError(
            f"the global batch of {global_batch} samples is not divisible by {world} ranks; with "
            "batch.micro_tokens each rank reads an equal share of every step (set batch.global_batch "
            f"to a multiple of {world})"
        )
    if zero_stage >= 2 and world > 1:
        raise UserError(
            "batch.micro_tokens on several ranks needs ZeRO stage 0 or 1: ZeRO stage 2 reduces "
            "gradients at every micro batch, and the ranks' micro batch counts differ"
        )
    ds_config.update(
        train_micro_batch_size_per_gpu=global_batch // world,
        gradient_accumulation_steps=1,
    )


def describe_batches(cfg: Any, ds_config: dict[str, Any], info: dict[str, Any]) -> str:
    """One line for the start-up: what a step and a micro batch hold, and which settings made them."""
    b = cfg.batch
    global_batch, micro = int(ds_config["train_batch_size"]), int(ds_config["train_micro_batch_size_per_gpu"])
    accum = int(ds_config["gradient_accumulation_steps"])
    world = global_batch // (micro * accum)
    mean = mean_sample_tokens(info, cfg.data.train_split)
    step = f"global batch {global_batch} samples, ~{global_batch * mean:,.0f} tokens"
    step += (
        f" (batch.global_tokens {b.global_tokens} at {mean:.1f} tokens per sample)"
        if b.global_tokens
        else " (batch.global_batch)"
    )
    if b.micro_tokens:
        parts = f"micro batches of at most {b.micro_tokens} tokens (batch.micro_tokens) of each rank's {micro} samples"
    else:
        parts = f"micro batches of {micro} samples (batch.micro_batch) x {accum} accumulation"
    return f"mosaicbert-ds: batches: {step}; {parts}; {world} rank(s)"


def graph_token_step(micro_tokens: int | None) -> int:
    """The CUDA-graph step's token bucket (mosaicbert_ds.graphed_mlm_step.pad_packed): 256 for micro batches
    in samples; with micro_tokens an eighth of the budget (rounded up to 256). A rank's micro
    batches of one step hold about the same number of tokens (split_by_tokens balances them), so
    they replay one or two graphs, padded by at most an eighth of the budget, and a run captures
    at most about eight token buckets."""
    if not micro_tokens:
        return 256
    return max(256, -(-micro_tokens // 8 // 256) * 256)
