"""Intensity normalisation with statistics computed once over a whole mosaic.

Per-chunk or per-tile normalisation makes seams, so the statistics (the low and
high percentiles of the grey levels) are computed once from pooled histograms of
the whole mosaic (exact and chunk-invariant for integer images) and every block
is mapped with the same affine transform.

Examples
--------
>>> import numpy as np
>>> img = np.arange(100, dtype=np.uint8).reshape(10, 10)
>>> st = stats_from_histogram(np.bincount(img.ravel(), minlength=256), 0.0, 100.0)
>>> st.low, st.high
(0.0, 99.0)
>>> [round(float(v), 4) for v in apply(img, st)[0, :3]]
[0.0, 0.0101, 0.0202]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from semdask.errors import InputError

__all__ = ["NormStats", "apply", "compute_stats", "stats_from_histogram"]


@dataclass(frozen=True)
class NormStats:
    """Affine intensity normalisation ``(x - low) / (high - low)``."""

    low: float
    high: float
    low_percentile: float = 0.5
    high_percentile: float = 99.5
    method: str = "percentile"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormStats:
        return cls(**{k: d[k] for k in ("low", "high", "low_percentile", "high_percentile",
                                          "method") if k in d})


def apply(block: np.ndarray, stats: NormStats) -> np.ndarray:
    """Map a block to float32 with the mosaic-wide statistics (no clipping)."""
    scale = 1.0 / max(stats.high - stats.low, 1e-12)
    out = (block.astype(np.float32) - np.float32(stats.low)) * np.float32(scale)
    return out.astype(np.float32, copy=False)


def stats_from_histogram(
    hist: np.ndarray,
    low_percentile: float,
    high_percentile: float,
    *,
    edges: np.ndarray | None = None,
) -> NormStats:
    """Percentiles from a pooled histogram (bin ``i`` is grey level ``i`` unless ``edges``)."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total <= 0:
        raise InputError("image", expected="at least one finite pixel", got="an empty histogram")
    cdf = np.cumsum(hist) / total
    centres = np.arange(hist.size, dtype=np.float64) if edges is None else (
        0.5 * (edges[:-1] + edges[1:]))
    lo_i = int(np.searchsorted(cdf, low_percentile / 100.0, side="left"))
    hi_i = int(np.searchsorted(cdf, high_percentile / 100.0, side="left"))
    lo, hi = float(centres[min(lo_i, hist.size - 1)]), float(centres[min(hi_i, hist.size - 1)])
    if hi <= lo:
        hi = lo + 1.0
    return NormStats(lo, hi, low_percentile, high_percentile)


def compute_stats(
    image: Any, low_percentile: float = 0.5, high_percentile: float = 99.5
) -> NormStats:
    """Mosaic-wide percentiles of a dask (or numpy) image, from pooled counts.

    Integer images use an exact per-grey-level histogram; float images are
    checked for NaN/inf (an error) and histogrammed in 4096 bins between min and max.
    """
    import dask.array as da

    x = da.asarray(image)
    if np.issubdtype(x.dtype, np.integer):
        if x.dtype.itemsize > 2:
            raise InputError("image dtype", expected="8- or 16-bit integers or floats",
                             got=str(x.dtype), fix="convert the image to uint16 or float32")
        info = np.iinfo(x.dtype)
        nbins = int(info.max) - int(info.min) + 1
        shifted = x.astype(np.int64) - int(info.min) if info.min < 0 else x
        hist = _bincount(shifted, nbins)
        h = np.asarray(hist.compute())
        st = stats_from_histogram(h, low_percentile, high_percentile)
        off = float(info.min) if info.min < 0 else 0.0
        return NormStats(st.low + off, st.high + off, low_percentile, high_percentile)
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError("image dtype", expected="an integer or float image", got=str(x.dtype))
    lo, hi, bad = da.compute(da.nanmin(x), da.nanmax(x), (~da.isfinite(x)).sum())
    if int(bad) > 0:
        raise InputError("image", expected="finite intensities",
                         got=f"{int(bad)} NaN or infinite pixels",
                         fix="fill or mask them before segmenting (e.g. np.nan_to_num)")
    lo, hi = float(lo), float(hi)
    if not math.isfinite(lo) or hi <= lo:
        return NormStats(lo, lo + 1.0, low_percentile, high_percentile)
    edges = np.linspace(lo, hi, 4097)
    h, _ = da.histogram(x, bins=edges)
    return stats_from_histogram(np.asarray(h.compute()), low_percentile, high_percentile,
                                edges=edges)


def _bincount(x: Any, nbins: int) -> Any:
    import dask.array as da

    def _count(b: np.ndarray) -> np.ndarray:
        return np.bincount(b.ravel().astype(np.int64), minlength=nbins).reshape(
            (1,) * b.ndim + (nbins,))

    parts = da.map_blocks(_count, x, dtype=np.int64, new_axis=x.ndim,
                          chunks=(*((1,) * n for n in x.numblocks), (nbins,)))
    return parts.sum(axis=tuple(range(x.ndim)))
