"""Multiscale pyramids: level shapes and chunk-invariant 2x downsampling (pure kernels).

Images get a 2x2 mean (integers rounded), label images a 2x2 mode, so every level-``k``
pixel depends on the same ``2**k`` block whatever the chunking. :mod:`semdask.storage.io`
writes the levels, :mod:`semdask.storage.ome` describes them.

Examples
--------
>>> n_levels((1000, 1333)), level_shapes((1000, 1333), 2)
(2, [(1000, 1333), (500, 667)])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np

__all__ = ["downsample_mean", "downsample_mode", "level_shapes", "n_levels"]


def n_levels(shape: Sequence[int], *, min_size: int = 512, max_levels: int = 10) -> int:
    """Number of 2x levels until the smaller (y, x) side is at most ``min_size``.

    >>> n_levels((512, 4000)), n_levels((513, 600)), n_levels((5000, 9000))
    (1, 2, 5)
    """
    s = min(shape[-2:])
    n = 1
    while s > min_size and n < max_levels:
        s = math.ceil(s / 2)
        n += 1
    return n


def level_shapes(shape: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Shapes of ``levels`` pyramid levels (ceil halving of the last two axes)."""
    out = [tuple(int(s) for s in shape)]
    for _ in range(1, levels):
        prev = out[-1]
        out.append((*prev[:-2], *(math.ceil(s / 2) for s in prev[-2:])))
    return out


def _even_pad(x: da.Array) -> da.Array:
    """Edge-pad the last two axes to even lengths and rechunk to an even regular grid."""
    for ax in (-2, -1):
        if x.shape[ax] % 2:
            edge = x[(..., slice(-1, None))] if ax == -1 else x[..., -1:, :]
            x = da.concatenate([x, edge], axis=ax)
    chunks = []
    for ax in range(x.ndim):
        if ax < x.ndim - 2:
            chunks.append(x.chunks[ax])
            continue
        c = max(x.chunks[ax][0], 2)
        chunks.append(c + (c % 2))
    return x.rechunk(tuple(chunks))


def _mean_block(b: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    h, w = b.shape[-2:]
    r = b.reshape(*b.shape[:-2], h // 2, 2, w // 2, 2).astype(np.float64)
    m = r.mean(axis=(-3, -1))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        m = np.clip(np.rint(m), info.min, info.max)
    return m.astype(dtype)


def _mode_block(b: np.ndarray) -> np.ndarray:
    h, w = b.shape[-2:]
    r = b.reshape(*b.shape[:-2], h // 2, 2, w // 2, 2)
    v = (r[..., 0, :, 0], r[..., 0, :, 1], r[..., 1, :, 0], r[..., 1, :, 1])
    # the six pairwise equalities give each corner's count (minus itself); a later corner
    # wins only with a strictly larger count, so ties go to the first in raster order
    e01, e02, e03 = v[0] == v[1], v[0] == v[2], v[0] == v[3]
    e12, e13, e23 = v[1] == v[2], v[1] == v[3], v[2] == v[3]
    counts = (e01 + e02.astype(np.uint8) + e03, e01 + e12.astype(np.uint8) + e13,
              e02 + e12.astype(np.uint8) + e23, e03 + e13.astype(np.uint8) + e23)
    out, best = v[0].copy(), counts[0]
    for value, count in zip(v[1:], counts[1:], strict=True):
        win = count > best
        out[win] = value[win]
        best = np.maximum(best, count)
    return out


def _halve(x: da.Array, fn: Any) -> da.Array:
    x = _even_pad(x)
    out_chunks = (*x.chunks[:-2], *(tuple(c // 2 for c in cs) for cs in x.chunks[-2:]))
    meta = np.empty((0,) * x.ndim, dtype=x.dtype)
    return da.map_blocks(fn, x, chunks=out_chunks, dtype=x.dtype, meta=meta)


def downsample_mean(x: da.Array) -> da.Array:
    """2x2 mean of the last two axes (odd edges edge-padded); integers rounded, same dtype.

    Every output pixel depends on the same 2x2 input pixels whatever the chunking.

    >>> import numpy as np, dask.array as da
    >>> downsample_mean(da.from_array(np.array([[0, 1, 8], [2, 3, 9]], np.uint8))).compute()
    array([[2, 8]], dtype=uint8)
    """
    return _halve(x, functools.partial(_mean_block, dtype=x.dtype))


def downsample_mode(x: da.Array) -> da.Array:
    """2x2 mode (most frequent value) of the last two axes, for label images.

    Ties go to the first value in (top-left, top-right, bottom-left, bottom-right) order,
    so the result is independent of the chunking.

    >>> import numpy as np, dask.array as da
    >>> downsample_mode(da.from_array(np.array([[1, 2, 3], [2, 2, 4]], np.uint8))).compute()
    array([[2, 3]], dtype=uint8)
    """
    return _halve(x, _mode_block)


# ---------------------------------------------------------------- semdask attributes
