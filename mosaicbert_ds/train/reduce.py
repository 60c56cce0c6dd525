"""Named values summed over ranks in one all-reduce.

    sums, rows = all_reduce_named({"loss": loss_tensor, "tokens": 1234.0}, {"health": health_row})
    sums["loss"], rows["health"][rank]

Scalars (device tensors or host numbers) are summed over ranks; each per-rank row is placed in a
[world, width] tensor of zeros at this rank's index, so the sum holds every rank's row. Everything
travels in one float64 tensor, packed and unpacked by name: the one host sync of an interval.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_named(
    scalars: dict[str, torch.Tensor | float],
    rows: dict[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> tuple[dict[str, float], dict[str, list[list[float]]]]:
    """(sums by name, every rank's row by name), on every rank."""
    rows = rows or {}
    device = device or next(
        (t.device for t in [*scalars.values(), *rows.values()] if torch.is_tensor(t)), torch.device("cpu")
    )
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    on_device = [k for k, v in scalars.items() if torch.is_tensor(v)]
    on_host = [k for k in scalars if k not in on_device]
    order = on_device + on_host
    parts = []
    if on_device:
        parts.append(torch.stack([scalars[k].detach().to(device, torch.float64).reshape(()) for k in on_device]))
    if on_host:  # one host-to-device copy for all of them
        parts.append(torch.tensor([float(scalars[k]) for k in on_host], dtype=torch.float64).to(device))
    for row in rows.values():
        table = torch.zeros(world, row.numel(), dtype=torch.float64, device=device)
        table[rank] = row.to(device=device, dtype=torch.float64).flatten()
        parts.append(table.flatten())
    packed = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(packed)
    values = packed.tolist()
    sums = dict(zip(order, values[: len(scalars)]))
    gathered, at = {}, len(scalars)
    for name, row in rows.items():
        width = row.numel()
        gathered[name] = [values[at + r * width : at + (r + 1) * width] for r in range(world)]
        at += world * width
    return sums, gathered
