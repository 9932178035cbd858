"""Kernel: on-disk layout of sharded Zarr v3 arrays (pure integer arithmetic)."""

from __future__ import annotations

__all__ = ["inner_chunk"]


def inner_chunk(shard: int, max_inner: int = 512, multiple: int = 16) -> int:
    """Largest divisor of ``shard`` not above ``max_inner`` (preferring multiples of 16).

    Zarr v3 sharding needs the inner chunk to divide the shard.

    >>> inner_chunk(1152), inner_chunk(1024), inner_chunk(100)
    (384, 512, 100)
    """
    if shard <= max_inner:
        return shard
    best = 1
    for d in range(min(shard, max_inner), 0, -1):
        if shard % d == 0:
            if d % multiple == 0:
                return d
            best = max(best, d)
    return best
