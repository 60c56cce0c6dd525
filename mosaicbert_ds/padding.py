"""Moving between a padded batch and the packed stream of real tokens.

unpad_input:  (B, L, ...) + mask (B, L) -> (total_tokens, ...), indices (total_tokens,),
              cu_seqlens int32 (B + 1,), max_seqlen int
pad_output:   (total_tokens, ...) + indices -> (B, L, ...) with zeros at the pads
"""

from __future__ import annotations

import torch


def unpad_input(
    hidden: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Keep the rows where attention_mask is 1. Sequences must be left-aligned (pads at the end)."""
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden.reshape(-1, *hidden.shape[2:])
    return flat[indices], indices, cu_seqlens, max_seqlen


def pad_output(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatter packed rows back into a zero (batch, seqlen, ...) tensor."""
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out[indices] = packed
    return out.view(batch, seqlen, *packed.shape[1:])


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Position of every packed token inside its own sequence (0-based), without a host sync."""
    cu = cu_seqlens.long()
    seqlens = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], seqlens, output_size=total_tokens)
    return torch.arange(total_tokens, device=cu.device) - starts


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """int32 (B + 1,) cumulative lengths with a leading 0."""
    return torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
