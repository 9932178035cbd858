"""Boundary F1: class-change pixels of prediction and truth matched within a tolerance.

Counts are per block with a halo of ``tolerance + 1`` px (``map_overlap``) and summed, so
the pooled precision, recall and F1 do not depend on the chunking.
"""

from __future__ import annotations

import math
from typing import Any

import dask.array as da
import numpy as np

from semdask.errors import InputError

__all__ = ["boundary_block_counts", "boundary_counts", "boundary_masks", "boundary_scores"]

IGNORE = 255


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def boundary_masks(pred: np.ndarray, truth: np.ndarray, n_classes: int, *,
                   ignore: int = IGNORE) -> tuple[np.ndarray, np.ndarray]:
    """Class-change pixels of ``pred`` and ``truth`` (kernel).

    A pixel is a boundary pixel of a map when it and a 4-neighbour are both labelled in the
    truth (not ``ignore``, id < ``n_classes``) and the map's ids differ there; both sides of
    an interface are boundary pixels, the image edge is none.

    >>> t = np.array([[0, 0, 1, 1]], np.uint8)
    >>> bp, bt = boundary_masks(t, t, 2)
    >>> bt.astype(int).tolist()
    [[0, 1, 1, 0]]
    """
    valid = (truth < n_classes) & (truth != ignore)

    def edges(lab: np.ndarray) -> np.ndarray:
        b = np.zeros(lab.shape, bool)
        for ax in (0, 1):
            lo = (slice(None, -1), slice(None)) if ax == 0 else (slice(None), slice(None, -1))
            hi = (slice(1, None), slice(None)) if ax == 0 else (slice(None), slice(1, None))
            d = (lab[lo] != lab[hi]) & valid[lo] & valid[hi]
            b[lo] |= d
            b[hi] |= d
        return b

    return edges(pred), edges(truth)


def _near(mask: np.ndarray, tolerance: float) -> np.ndarray:
    """Pixels within ``tolerance`` px (Euclidean) of ``mask``: a disk dilation (small
    tolerances, faster) or a distance transform; both exact on the pixel grid."""
    if tolerance < 1 or not mask.any():
        return mask
    from scipy import ndimage

    if tolerance <= 6:
        r = int(tolerance)
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        return np.asarray(ndimage.binary_dilation(mask, structure=yy * yy + xx * xx
                                                  <= tolerance * tolerance))
    return np.asarray(ndimage.distance_transform_edt(~mask) <= tolerance)


def boundary_block_counts(pred: np.ndarray, truth: np.ndarray, n_classes: int,
                          tolerance: float, *, core: int = 0,
                          ignore: int = IGNORE) -> np.ndarray:
    """Boundary counts of one block with a halo of ``core`` px (kernel).

    Returns int64 ``(4, n_classes + 1)``: rows = predicted boundary pixels, those within
    ``tolerance`` px (Euclidean) of a truth boundary pixel of the same class, truth boundary
    pixels, those within ``tolerance`` of a predicted one; columns = classes, then all
    classes together (class-agnostic matching). Only the core (the block without its halo)
    is counted; the halo must be at least ``ceil(tolerance) + 1`` px.

    >>> t = np.array([[0, 0, 1, 1]] * 3, np.uint8); p = np.array([[0, 1, 1, 1]] * 3, np.uint8)
    >>> boundary_block_counts(p, t, 2, 0).tolist()
    [[3, 3, 6], [0, 0, 3], [3, 3, 6], [0, 0, 3]]
    >>> boundary_block_counts(p, t, 2, 1)[[1, 3]].tolist()
    [[3, 3, 6], [3, 3, 6]]
    """
    bp, bt = boundary_masks(pred, truth, n_classes, ignore=ignore)
    h, w = pred.shape
    c = (slice(core, h - core), slice(core, w - core))
    out = np.zeros((4, n_classes + 1), np.int64)
    for k in range(n_classes + 1):
        mp, mt = (bp, bt) if k == n_classes else (bp & (pred == k), bt & (truth == k))
        out[0, k], out[2, k] = mp[c].sum(), mt[c].sum()
        if (out[0, k] or out[2, k]) and mp.any() and mt.any():  # the halo counts too
            out[1, k] = (mp & _near(mt, tolerance))[c].sum()
            out[3, k] = (mt & _near(mp, tolerance))[c].sum()
    return out


def boundary_counts(pred: Any, truth: Any, n_classes: int, *, tolerance: float = 2.0,
                    ignore: int = IGNORE) -> da.Array:
    """Pooled boundary counts (see :func:`boundary_block_counts`), chunking-independent.

    Per chunk with ``map_overlap`` (halo ``ceil(tolerance) + 1``; outside the mosaic counts
    as unlabelled), summed over chunks: int64 ``(4, n_classes + 1)``.

    >>> t = np.kron(np.array([[0, 1], [2, 0]], np.uint8), np.ones((8, 8), np.uint8))
    >>> a = boundary_counts(da.from_array(t, chunks=3), t, 3, tolerance=1).compute()
    >>> bool((a == boundary_counts(t, t, 3, tolerance=1).compute()).all()), a[:, -1].tolist()
    (True, [60, 60, 60, 60])
    """
    from dask.array.overlap import ensure_minimum_chunksize

    if not tolerance >= 0:
        raise InputError("tolerance", expected="a distance >= 0 px", got=repr(tolerance))
    t = da.asarray(truth)
    p = da.asarray(pred)
    if p.shape != t.shape:
        raise InputError("prediction", expected=f"the truth's shape {t.shape}",
                         got=f"shape {p.shape}", fix="compare label maps of the same mosaic/level")
    depth, n = math.ceil(tolerance) + 1, int(n_classes)
    t = t.rechunk(tuple(ensure_minimum_chunksize(depth, c) for c in t.chunks))
    p = p.rechunk(t.chunks)

    def f(pb: np.ndarray, tb: np.ndarray) -> np.ndarray:
        return boundary_block_counts(pb, tb, n, tolerance, core=depth,
                                     ignore=ignore)[None, None]

    parts = da.map_overlap(f, p, t, depth=depth, boundary=ignore, trim=False, dtype=np.int64,
                           new_axis=[2, 3], chunks=(*((1,) * k for k in t.numblocks), (4,),
                                                    (n + 1,)),
                           meta=np.empty((0, 0, 0, 0), np.int64))
    return parts.sum(axis=(0, 1))


def boundary_scores(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Boundary precision, recall and F1 per column of :func:`boundary_counts`.

    Precision = matched / predicted boundary pixels, recall = matched / truth boundary pixels;
    NaN where a map has no boundary pixels (F1 is 0 when only one of them has some).

    >>> s = boundary_scores(np.array([[4, 0], [2, 0], [2, 0], [2, 0]]))
    >>> [s[k].tolist() for k in ("precision", "recall", "f1")]
    [[0.5, nan], [1.0, nan], [0.6666666666666666, nan]]
    """
    c = np.asarray(counts, dtype=np.float64)
    prec, rec = _ratio(c[1], c[0]), _ratio(c[3], c[2])
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    f1 = np.where((c[0] > 0) & (c[2] > 0), f1, np.where(c[0] + c[2] > 0, 0.0, np.nan))
    return {"precision": prec, "recall": rec, "f1": f1}
