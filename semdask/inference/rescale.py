"""Pixel-size awareness: resample a mosaic to the model's scale and the probabilities back.

The resampling is separable and evaluated on a *global* output grid: output pixel ``i``
sits at input coordinate ``(i + 0.5) / factor - 0.5`` (pixel centres aligned), and its
value is a normalised triangle-kernel (linear) sum over a fixed number of input taps,
with the kernel widened by ``1 / factor`` when downsampling (antialiasing, like PIL's
bilinear resize) and mirror-symmetric extension at the edges. Every output pixel is a
pure function of its global index and the input, summed in a fixed tap order, so the
lazy :func:`resample` gives bitwise the same values for any chunking, and the same
values as :func:`resample_numpy` on the whole array.

:func:`rescaled_probs` chains it with :func:`semdask.inference.graph.blended_probs`: image ->
model scale -> class probabilities -> original grid (linear) — the caller takes the
argmax, so outputs keep the mosaic's shape and pixel size.

Examples
--------
>>> import numpy as np, dask.array as da
>>> x = np.arange(64, dtype=np.float32).reshape(8, 8)
>>> up = resample_numpy(x, 2.0)
>>> up.shape, float(up[1, 1]), float(up[15, 15])  # linear; mirrored edges
((16, 16), 2.25, 63.0)
>>> lazy = resample(da.from_array(x, chunks=3), 2.0, chunk=5).compute()
>>> bool((lazy == up).all())
True
>>> resample_numpy(up, 0.5).shape
(8, 8)
>>> scale_factor(0.08916, 0.04458), scale_factor(0.0450, 0.04458), scale_factor(None, 0.04458)
(2.0, 1.0, 1.0)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np

from semdask.errors import InputError

__all__ = [
    "TOLERANCE",
    "relative_scale",
    "resample",
    "resample_nearest",
    "resample_numpy",
    "rescaled_probs",
    "scale_factor",
    "target_shape",
]

log = logging.getLogger(__name__)

#: Relative pixel-size difference below which ``rescale=None`` (auto) does not resample.
TOLERANCE = 0.05


def scale_factor(mosaic_um: float | None, model_um: float | None, *,
                 rescale: bool | None = None, tolerance: float = TOLERANCE) -> float:
    """The zoom that brings a mosaic to the model's scale (1.0: no resampling).

    ``factor = mosaic_um / model_um``: a mosaic with twice the model's pixel size is
    upsampled 2x. ``rescale=None`` (auto) resamples only when both pixel sizes are known
    and differ by more than ``tolerance`` (relative), logging a warning when one is
    unknown; ``rescale=False`` never resamples; ``rescale=True`` resamples whenever they
    differ at all and raises :class:`InputError` when one is unknown.
    """
    if rescale is False:
        return 1.0
    if mosaic_um is None or model_um is None:
        what = "the mosaic's" if mosaic_um is None else "the model's training"
        if rescale:
            raise InputError("rescale", expected="known pixel sizes of mosaic and model",
                             got=f"{what} pixel size is unknown",
                             fix="set it (semdask convert --pixel-size UM) or use --no-rescale")
        log.warning("%s pixel size is unknown: not resampling to the model's scale "
                    "(pass the pixel size to semdask convert --pixel-size)", what)
        return 1.0
    if mosaic_um <= 0 or model_um <= 0:
        raise InputError("pixel size", expected="> 0", got=f"{mosaic_um} / {model_um} um")
    f = float(mosaic_um) / float(model_um)
    if rescale is None and abs(f - 1.0) <= tolerance:
        return 1.0
    return f


def target_shape(shape: Sequence[int], factor: float) -> tuple[int, int]:
    """(y, x) size of ``shape`` (last two axes) resampled by ``factor``."""
    return (max(1, round(int(shape[-2]) * factor)), max(1, round(int(shape[-1]) * factor)))


def _mirror(j: np.ndarray, n: int) -> np.ndarray:
    """Symmetric extension (``-1 -> 0``, ``n -> n - 1``) of integer indices."""
    j = np.mod(j, 2 * n)
    return np.where(j >= n, 2 * n - 1 - j, j)


def _taps(n_in: int, factor: float, start: int, stop: int,
          order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights ``(stop - start, K)`` of output pixels ``start:stop``."""
    centre = (np.arange(start, stop, dtype=np.float64) + 0.5) / factor - 0.5
    if order == 0:
        nearest = _mirror(np.floor(centre + 0.5).astype(np.int64), n_in)[:, None]
        return nearest, np.ones((stop - start, 1), np.float32)
    s = max(1.0, 1.0 / factor)  # kernel half-width: wider when downsampling (antialias)
    k = int(np.ceil(2 * s)) + 1
    j = np.floor(centre - s).astype(np.int64)[:, None] + 1 + np.arange(k)
    w = np.maximum(0.0, 1.0 - np.abs(j - centre[:, None]) / s)
    w /= w.sum(axis=1, keepdims=True)
    return _mirror(j, n_in), w.astype(np.float32)


def _apply(x: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Weighted sum of taps along ``axis`` in a fixed order (bitwise chunk-invariant)."""
    x = np.moveaxis(x, axis, -1)
    out = np.zeros((*x.shape[:-1], idx.shape[0]), np.float32)
    for k in range(idx.shape[1]):
        out += w[:, k] * x[..., idx[:, k]]
    return np.moveaxis(out, -1, axis)


def _block(x: np.ndarray, *, n_in: tuple[int, int], factor: float, ys: tuple[int, int],
           xs: tuple[int, int], off: tuple[int, int], order: int) -> np.ndarray:
    """Kernel: output pixels ``ys x xs`` from the input slice ``x`` starting at ``off``."""
    iy, wy = _taps(n_in[0], factor, *ys, order=order)
    ix, wx = _taps(n_in[1], factor, *xs, order=order)
    x = x if order == 0 else x.astype(np.float32, copy=False)
    if order == 0:
        return x[..., (iy[:, 0] - off[0])[:, None], ix[:, 0] - off[1]]
    return _apply(_apply(x, iy - off[0], wy, x.ndim - 2), ix - off[1], wx, x.ndim - 1)


def resample_numpy(x: np.ndarray, factor: float, *, shape: Sequence[int] | None = None,
                   order: int = 1) -> np.ndarray:
    """Resample the last two axes of an in-memory array (``order`` 1: linear with
    antialiasing, float32; 0: nearest, same dtype — for label maps)."""
    n = (int(x.shape[-2]), int(x.shape[-1]))
    out = tuple(shape) if shape is not None else target_shape(x.shape, factor)
    return _block(np.asarray(x), n_in=n, factor=float(factor), ys=(0, int(out[-2])),
                  xs=(0, int(out[-1])), off=(0, 0), order=order)


def resample_nearest(x: np.ndarray, factor: float, *,
                     shape: Sequence[int] | None = None) -> np.ndarray:
    """Nearest-neighbour resampling of a label map on the same grid as :func:`resample`."""
    return resample_numpy(x, factor, shape=shape, order=0)


def _edges(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def resample(x: da.Array, factor: float, *, shape: Sequence[int] | None = None,
             chunk: int | None = None, order: int = 1) -> da.Array:
    """Lazily resample the last two axes of ``x`` ((y, x) or (c, y, x)) by ``factor``.

    Parameters
    ----------
    x : dask.array.Array
    factor : float
        Output pixels per input pixel (> 1 upsamples, < 1 downsamples with antialiasing).
    shape : (int, int), optional
        Output (y, x) size [default: ``round(n * factor)``]; the grid mapping always uses
        ``factor``, so a round trip ``factor`` then ``1 / factor`` with the original shape
        lands on the original pixel centres.
    chunk : int, optional
        Output chunk edge [default: the input's]; a chunk edge that is a multiple of a
        shard edge gives shard-aligned writes.
    order : {1, 0}
        Linear (float32 output) or nearest (input dtype).

    Returns
    -------
    dask.array.Array
        One task per output chunk, reading only the input it needs; identical values for
        any input or output chunking.
    """
    if factor <= 0 or not np.isfinite(factor):
        raise InputError("factor", expected="a finite number > 0", got=repr(factor))
    n = (int(x.shape[-2]), int(x.shape[-1]))
    out = tuple(int(s) for s in shape) if shape is not None else target_shape(n, factor)
    edge = int(chunk or max(x.chunksize[-1], x.chunksize[-2]))
    dtype = x.dtype if order == 0 else np.dtype(np.float32)
    lead = tuple(int(s) for s in x.shape[:-2])
    task = dask.delayed(_block, pure=True)
    rows = []
    for ys in _edges(out[0], edge):
        iy, _ = _taps(n[0], factor, *ys, order=order)
        row = []
        for xs in _edges(out[1], edge):
            ix, _ = _taps(n[1], factor, *xs, order=order)
            y0, y1, x0, x1 = int(iy.min()), int(iy.max()) + 1, int(ix.min()), int(ix.max()) + 1
            d = task(x[..., y0:y1, x0:x1], n_in=n, factor=float(factor), ys=ys, xs=xs,
                     off=(y0, x0), order=order)
            row.append(da.from_delayed(d, (*lead, ys[1] - ys[0], xs[1] - xs[0]), dtype=dtype,
                                       meta=np.empty((0,) * x.ndim, dtype)))
        rows.append(row)
    return da.block(rows)


def rescaled_probs(image: da.Array, model: Any, *, factor: float, n_classes: int,
                   stats: Any, plan_kwargs: dict[str, Any], chunk: int | None = None,
                   plan: Any = None, **infer_kwargs: Any) -> tuple[da.Array, Any]:
    """Class probabilities on ``image``'s grid, inferred at the model's scale.

    The image is resampled by ``factor`` (:func:`scale_factor`), segmented with
    :func:`semdask.inference.graph.blended_probs` under a plan for the resampled shape
    (``plan_kwargs`` as for :func:`semdask.inference.graph.plan_inference`), and the probabilities
    are resampled back by ``1 / factor`` onto the original grid (linear; they still sum
    to one). Returns ``(probs (C, y, x) float32, plan at the model's scale)``; output
    chunks have edge ``chunk`` [default: the plan's]. ``plan``: the plan at the model's
    scale when the caller has built it already (:class:`semdask.inference.run.SegmentRun`).
    """
    from semdask.inference.graph import blended_probs, plan_inference

    shape = (int(image.shape[-2]), int(image.shape[-1]))
    inner = target_shape(shape, factor)
    plan = plan if plan is not None else plan_inference(inner, **plan_kwargs)
    if tuple(plan.shape) != inner:
        raise InputError("plan", expected=f"a plan for the model-scale shape {inner}",
                         got=str(plan.shape))
    scaled = resample(image, factor, chunk=plan.chunk)
    p = blended_probs(scaled, model, n_classes=n_classes, stats=stats, plan=plan,
                      **infer_kwargs)
    log.info("resampled %d x %d px by %.4g to the model's scale (%d x %d px) and back",
             *shape, factor, *inner)
    return resample(p, 1.0 / factor, shape=shape, chunk=chunk or plan.chunk), plan


def relative_scale(mosaic_um: float | None, model: Any, *,
                   rescale: bool | None = None) -> float | None:
    """The ``--scale`` of a model trained on stores of unknown pixel size, for such mosaics.

    When neither the mosaic's nor the model's pixel size is known, the only scale
    information is that the model was trained at ``F`` x its stores' sampling: a mosaic
    sampled like those stores is resampled by ``F``. ``None`` in every other case
    (pixel sizes decide, :func:`semdask.inference.rescale.scale_factor`).

    >>> from types import SimpleNamespace as NS
    >>> cfg = NS(pixel_size_um=None, provenance={"training_scale": {"scale": 0.5}})
    >>> relative_scale(None, cfg), relative_scale(0.1, cfg)
    (0.5, None)
    >>> relative_scale(None, cfg, rescale=False) is None
    True
    """
    if rescale is False or mosaic_um is not None or model.pixel_size_um is not None:
        return None
    info = (getattr(model, "provenance", None) or {}).get("training_scale") or {}
    f = info.get("scale")
    if not f or float(f) == 1.0:
        return None
    log.info("mosaic and model pixel sizes are unknown: resampling by the model's "
             "training scale %g", float(f))
    return float(f)
