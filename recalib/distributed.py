"""Exact multi-process aggregation of channel moments with ``torch.distributed``.

Every rank packs its per-layer ``(items, moments)`` into one float64 vector, the vectors
are all-gathered, and each rank merges them in rank order with the exact Chan update. All
ranks therefore end with bit-identical statistics, equal (up to float64 rounding) to what
one process over the union of the shards would compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .moments import ChannelMoments

__all__ = ["all_gather_moments", "distributed_active", "global_counts"]


def distributed_active() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _pack(parts: Sequence[tuple[ChannelMoments, int]]) -> torch.Tensor:
    chunks = []
    for mom, items in parts:
        chunks.append(torch.tensor([float(items)], dtype=torch.float64))
        chunks.append(mom.pack().cpu())
    return torch.cat(chunks)


def _unpack(vec: torch.Tensor, sizes: Sequence[int]) -> list[tuple[ChannelMoments, int]]:
    out = []
    offs = 0
    for s in sizes:
        items = int(vec[offs].item())
        out.append((ChannelMoments.unpack(vec[offs + 1 : offs + 1 + s]), items))
        offs += 1 + s
    return out


def all_gather_moments(
    parts: Sequence[tuple[ChannelMoments, int]],
) -> list[tuple[ChannelMoments, int]]:
    """Merge every rank's ``(moments, items)`` per layer across all ranks, in rank order."""
    sizes = [mom.pack().numel() for mom, _ in parts]
    local = _pack(parts)
    if dist.get_backend() == "nccl":
        local = local.to(torch.device("cuda", torch.cuda.current_device()))
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    merged = _unpack(gathered[0].cpu(), sizes)
    for vec in gathered[1:]:
        rank_parts = _unpack(vec.cpu(), sizes)
        merged = [
            (a.merge(b), ia + ib) for (a, ia), (b, ib) in zip(merged, rank_parts, strict=True)
        ]
    devices = [mom.mean.device for mom, _ in parts]
    return [(mom.to(d), items) for (mom, items), d in zip(merged, devices, strict=True)]


def global_counts(items: int, batches: int) -> tuple[int, int]:
    """Sum of items and batches over all ranks (for the report)."""
    t = torch.tensor([float(items), float(batches)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(t)
    return int(t[0].item()), int(t[1].item())
