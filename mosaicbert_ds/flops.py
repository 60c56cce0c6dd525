"""FLOP counts and model FLOP utilisation (MFU).

The paper's Appendix H: MFU = 6 * n_params * tokens/s / (n_gpus * peak FLOP/s), counting real
(non-pad) tokens. The 6 is 2 FLOPs per multiply-add times 3 for forward + backward; it counts
every parameter, the embeddings included, and no attention score FLOPs.

`training_flops` is the exact matmul count of one training step instead:
  per token and layer   qkv 2*d*3d, attention output 2*d*d, MLP 2*d*(2ff for GLU, ff otherwise) + 2*ff*d
  per sequence, layer   scores and weighted values: 2 * 2*L^2*d (full bidirectional L x L)
  per masked token      head dense 2*d*d + decoder 2*d*V (the head runs on masked tokens only)
times 3 for forward + backward. Embedding lookups, LayerNorm and elementwise work are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import MosaicBertConfig

# Dense bf16 tensor-core peak, FLOP/s, from the vendors' datasheets (SXM parts, no sparsity).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


# The bare MosaicBERT-Base training step at micro batch 256 (real tokens/s, the best of autocast and
# CUDA graphs), measured per GPU: what the trainer's throughput is held against. Each entry names the
# result folder, commit and command it comes from.
BARE_STEP_TOKENS_PER_SEC: dict[str, tuple[float, str]] = {
    "H200": (604_708, "benchmarks/results/h200_2026-11-29, a609120, python -m benchmarks.step --quick"),
}


def bare_step_reference(device: torch.device | str | None = None) -> tuple[float, str] | None:
    """(real tokens/s, source) of the bare step on the current CUDA device's kind, or None."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in BARE_STEP_TOKENS_PER_SEC.items() if key in name), None)


def peak_flops(device: torch.device | str | None = None, override: float | None = None) -> float | None:
    """The bf16 peak of the current CUDA device by name, or `override`; None when unknown (CPU)."""
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def paper_flops_per_token(n_params: int) -> float:
    """Appendix H: 6 FLOPs per parameter per token for a training step."""
    return 6.0 * n_params


def training_flops(config: MosaicBertConfig, seqlens: Sequence[int], n_masked: int) -> float:
    """Exact matmul FLOPs of one forward + backward over sequences of the given real lengths."""
    d, ff, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = sum(seqlens)
    mlp_in = 2 * ff if config.mlp_type == "glu" else ff
    per_token_layer = 2 * d * 3 * d + 2 * d * d + 2 * d * mlp_in + 2 * ff * d
    attention = sum(4 * n * n * d for n in seqlens)
    head = n_masked * (2 * d * d + 2 * d * config.vocab_size)
    return 3.0 * (n_layers * (tokens * per_token_layer + attention) + head)


def mfu(flops_per_second: float, n_gpus: int, peak: float | None) -> float | None:
    """Achieved FLOP/s over the peak of all GPUs; None when the peak is unknown."""
    return flops_per_second / (n_gpus * peak) if peak else None
