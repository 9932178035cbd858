"""EDS registration: load EDS element maps, estimate their shift, upsample them onto SEM pixels.

EDS maps have a lower resolution than the SEM image and are often shifted against it (drift,
interaction volume). This module holds the pure kernels (numpy/scipy/skimage, one block in,
one out) and the Dask builders around them:

* :func:`estimate_shift` -- sub-pixel misregistration of EDS maps against an SEM tile
  (phase cross-correlation with a least-squares "SEM predicted from EDS" proxy);
  :func:`aggregate_shifts` turns tile estimates into a robust, smooth shift field (a
  :class:`ShiftField`) and :func:`resample_block` upsamples EDS onto SEM pixels through
  that field (bilinear, :func:`interpolate_field`).
* :func:`load_eds` -- EDS maps (:class:`EdsMaps`) from the store, files or arrays;
  :func:`register_eds` -- one :func:`estimate_shift` task per tile, aggregated;
  :func:`upsample_eds` -- lazy shift-corrected upsampling with ``map_overlap``.

Examples
--------
>>> s = np.zeros((3, 3, 2)); s[..., 1] = -2.0
>>> f, ok = aggregate_shifts(s, np.ones((3, 3)))
>>> f[:, 0, 0].tolist(), bool(ok.all())
([0.0, -2.0], True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
from scipy import ndimage as ndi

from semdask.errors import InputError, SemdaskError
from semdask.labelling.features import chunk_grid
from semdask.storage import arrays as sarr
from semdask.storage import io

__all__ = [
    "EdsMaps",
    "ShiftField",
    "aggregate_shifts",
    "estimate_shift",
    "interpolate_field",
    "load_eds",
    "register_eds",
    "resample_block",
    "upsample_eds",
]

log = logging.getLogger(__name__)
_F32 = np.empty((0, 0, 0), np.float32)


# ----------------------------------------------------------------------------- kernels
def estimate_shift(sem: np.ndarray, eds: np.ndarray, *, upsample_factor: int = 20,
                   lowpass: float = 1.0) -> tuple[float, float, float]:
    """Displacement (dy, dx) of EDS features relative to the SEM image, and a quality.

    ``sem`` is the SEM tile binned onto the EDS grid (h, w); ``eds`` the EDS maps (c, h, w).
    A proxy "SEM predicted from EDS" (least-squares linear combination of the channels
    plus a constant) is registered to the low-passed SEM by phase cross-correlation
    (``normalization=None``, Hann window, sub-pixel ``1 / upsample_factor``); the fit is
    repeated once on the aligned maps. Quality = correlation of SEM and aligned proxy.
    Units: EDS pixels.
    """
    from skimage.registration import phase_cross_correlation

    s = np.asarray(sem, np.float64)
    e = np.asarray(eds, np.float64)
    if lowpass > 0:
        s = ndi.gaussian_filter(s, lowpass, mode="nearest")
    A = np.concatenate([e.reshape(e.shape[0], -1), np.ones((1, s.size))]).T
    win = np.outer(np.hanning(s.shape[0]), np.hanning(s.shape[1]))
    ref = (s - s.mean()) * win
    shift = np.zeros(2)
    proxy = s
    for _ in range(2):
        moved = ndi.shift(e, (0, *shift), order=1, mode="nearest").reshape(e.shape[0], -1)
        coef = np.linalg.lstsq(np.concatenate([moved, np.ones((1, s.size))]).T, s.ravel(),
                               rcond=None)[0]
        proxy = (A @ coef).reshape(s.shape)
        shift = phase_cross_correlation(ref, (proxy - proxy.mean()) * win, normalization=None,
                                        upsample_factor=upsample_factor)[0]
    aligned = ndi.shift(proxy, shift, order=1, mode="nearest")
    q = float(np.corrcoef(s.ravel(), aligned.ravel())[0, 1]) if s.std() > 0 else 0.0
    return float(-shift[0]), float(-shift[1]), q if math.isfinite(q) else 0.0


def aggregate_shifts(shifts: np.ndarray, quality: np.ndarray, *, min_quality: float = 0.3,
                     max_deviation: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Robust smooth shift field (2, ny, nx) from tile estimates ``shifts`` (ny, nx, 2).

    Tiles with ``quality < min_quality`` or farther than ``max(3 * 1.4826 * MAD,
    max_deviation)`` from the median are outliers, replaced by the median of their inlier
    neighbours (else the global median); the field is then smoothed by a 3 x 3 mean.
    Returns the field and the inlier mask (ny, nx). No inlier at all: a zero field.

    >>> s = np.zeros((3, 3, 2)); s[..., 0] = 1.0; s[1, 1] = (9.0, 9.0)
    >>> f, ok = aggregate_shifts(s, np.ones((3, 3)))
    >>> f[:, 1, 1].tolist(), int(ok.sum())
    ([1.0, 0.0], 8)
    """
    s = np.asarray(shifts, np.float64)
    ok = (np.asarray(quality) >= min_quality) & np.isfinite(s).all(-1)
    if not ok.any():
        log.warning("EDS registration: no tile had enough structure (quality >= %g); "
                    "assuming no shift", min_quality)
        return np.zeros((2, *s.shape[:2])), ok
    med = np.median(s[ok], axis=0)
    mad = np.median(np.abs(s[ok] - med), axis=0)
    ok &= (np.abs(s - med) <= np.maximum(3 * 1.4826 * mad, max_deviation)).all(-1)
    med = np.median(s[ok], axis=0)
    field = np.empty((2, *s.shape[:2]))
    for iy, ix in np.ndindex(*s.shape[:2]):
        if ok[iy, ix]:
            field[:, iy, ix] = s[iy, ix]
            continue
        nb = (slice(max(iy - 1, 0), iy + 2), slice(max(ix - 1, 0), ix + 2))
        field[:, iy, ix] = np.median(s[nb][ok[nb]], axis=0) if ok[nb].any() else med
    if min(s.shape[:2]) >= 3:
        field = ndi.uniform_filter(field, (1, 3, 3), mode="nearest")
    return field, ok


def interpolate_field(field: np.ndarray, centres: tuple[np.ndarray, np.ndarray],
                      ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation of ``field`` (2, ny, nx) known at tile ``centres`` (y, x),
    at the grid ``ys`` x ``xs`` (constant beyond the outer centres); two (h, w) arrays."""
    cy, cx = (np.asarray(c, np.float64) for c in centres)
    fy = np.interp(ys, cy, np.arange(cy.size)) if cy.size > 1 else np.zeros(len(ys))
    fx = np.interp(xs, cx, np.arange(cx.size)) if cx.size > 1 else np.zeros(len(xs))
    if np.ptp(field[0]) == 0 and np.ptp(field[1]) == 0:  # constant: no per-pixel work
        shape = (len(ys), len(xs))
        return np.full(shape, field[0].flat[0]), np.full(shape, field[1].flat[0])
    gy, gx = np.meshgrid(fy, fx, indexing="ij")
    dy, dx = (ndi.map_coordinates(f, [gy, gx], order=1, mode="nearest") for f in field)
    return dy, dx


@dataclass(frozen=True)
class ShiftField:
    """EDS misregistration per tile: displacement (dy, dx) of EDS features relative to the
    SEM image, in SEM px, at tile ``centres``; ``field`` is the robust smoothed version."""

    factor: int
    tile: int
    centres: tuple[np.ndarray, np.ndarray]
    field: np.ndarray  # (2, ny, nx)
    raw: np.ndarray  # (ny, nx, 2)
    quality: np.ndarray  # (ny, nx)
    inliers: np.ndarray  # (ny, nx) bool

    @property
    def mean(self) -> tuple[float, float]:
        """Mean (dy, dx) of the field, SEM px."""
        return float(self.field[0].mean()), float(self.field[1].mean())

    @property
    def max_abs(self) -> float:
        return float(np.abs(self.field).max()) if self.field.size else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"mean_sem_px": list(self.mean), "mean_eds_px": [v / self.factor for v in
                                                                self.mean],
                "tile": self.tile, "tiles": list(self.raw.shape[:2]),
                "inliers": int(self.inliers.sum()), "field_sem_px": self.field.tolist(),
                "quality": self.quality.round(3).tolist()}

    @classmethod
    def zero(cls, shape: tuple[int, int], factor: int) -> ShiftField:
        c = (np.array([shape[0] / 2]), np.array([shape[1] / 2]))
        return cls(factor, max(shape), c, np.zeros((2, 1, 1)), np.zeros((1, 1, 2)),
                   np.zeros((1, 1)), np.zeros((1, 1), bool))



def resample_block(eds: np.ndarray, *, eds_origin: tuple[int, int],
                   out_origin: tuple[int, int], out_shape: tuple[int, int], factor: int,
                   field: np.ndarray, centres: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Bilinear EDS values (c, h, w) float32 on SEM pixels, corrected by the shift field.

    ``eds`` covers global EDS pixels from ``eds_origin``; ``field`` (2, ny, nx) holds EDS
    feature displacements in SEM px at ``centres``. SEM pixel y samples EDS coordinate
    ``(y + dy + 0.5) / factor - 0.5`` (pixel centres; clamped at the block edge).
    """
    (y0, x0), (h, w) = out_origin, out_shape
    ys, xs = np.arange(y0, y0 + h, dtype=np.float64), np.arange(x0, x0 + w, dtype=np.float64)
    dy, dx = interpolate_field(field, centres, ys, xs)
    u = (ys[:, None] + dy + 0.5) / factor - 0.5 - eds_origin[0]
    v = (xs[None, :] + dx + 0.5) / factor - 0.5 - eds_origin[1]
    out = np.empty((eds.shape[0], h, w), np.float32)
    for c in range(eds.shape[0]):
        out[c] = ndi.map_coordinates(np.asarray(eds[c], np.float32), [u, v], order=1,
                                     mode="nearest")
    return out



# ----------------------------------------------------------------------------- Dask
@dataclass(frozen=True)
class EdsMaps:
    """EDS element maps ``data`` float32 (c, ceil(H/factor), ceil(W/factor)) of an H x W
    mosaic; ``true_shift_px`` (EDS px) is known for synthetic mosaics only."""

    data: da.Array
    channels: tuple[str, ...]
    factor: int
    true_shift_px: tuple[float, float] | None = None


# ----------------------------------------------------------------------------- EDS
def load_eds(source: Any, shape: tuple[int, int], *, mosaic: Any = None,
             channels: Sequence[str] | None = None) -> EdsMaps:
    """EDS maps for an H x W mosaic from ``"store"`` (the mosaic's ``eds`` group), a mapping
    ``{element: image file or 2-D array}`` or a (c, h, w) array; resolution ``1 / factor``.

    Raises
    ------
    InputError
        Wrong dimensions, maps of different sizes, or no integer resolution factor.
    """
    true = None
    if isinstance(source, str) and source == "store":
        try:
            arr = io.open_extra_image(mosaic, "eds")
        except SemdaskError as e:
            raise InputError("EDS maps", expected=f"an 'eds' image group in {mosaic}",
                             got="none", fix="pass --eds Ni=ni.tif --eds O=o.tif ..., or "
                             "--eds none for SEM-only features") from e
        sem = sarr.read_attrs(mosaic, "eds").get("semdask") or {}
        names = tuple(sem.get("channels") or (f"eds{i}" for i in range(arr.shape[0])))
        true = tuple(sem["true_shift_px"]) if "true_shift_px" in sem else None
    elif isinstance(source, Mapping):
        from semdask.ingest.readers import open_image

        maps = []
        for v in source.values():
            if isinstance(v, str | Path):
                img = open_image(v)
                v = img.read(0, img.shape[0], 0, img.shape[1])
            maps.append(np.asarray(v, np.float32))
        if any(m.ndim != 2 for m in maps) or len({m.shape for m in maps}) != 1:
            raise InputError("EDS maps", expected="2-D element maps of one size",
                             got=f"shapes {[m.shape for m in maps]}",
                             fix="export one single-channel image per element at one size")
        arr, names = da.from_array(np.stack(maps)), tuple(source)
    else:
        arr = source if isinstance(source, da.Array) else da.from_array(np.asarray(source))
        names = tuple(channels or (f"eds{i}" for i in range(arr.shape[0] if arr.ndim else 0)))
    if arr.ndim != 3 or len(names) != arr.shape[0]:
        raise InputError("EDS maps", expected="a (c, y, x) stack with one name per channel",
                         got=f"shape {arr.shape}, channels {list(names)}",
                         fix="stack the element maps: np.stack([ni, o, zr]) (one map: m[None])")
    H, W = shape
    f = max(1, round(H / arr.shape[1]))
    if any(abs(n * f - s) >= f for n, s in zip(arr.shape[1:], shape, strict=True)):
        raise InputError("EDS maps", expected=f"an integer fraction of the {H} x {W} mosaic "
                         f"(e.g. {-(-H // 4)} x {-(-W // 4)} for 1/4)",
                         got=f"{arr.shape[1]} x {arr.shape[2]}",
                         fix="resample the maps to 1/n of the SEM size, or crop the SEM image")
    he, we = -(-H // f), -(-W // f)
    arr = arr[:, :he, :we].astype(np.float32)
    if arr.shape[1:] != (he, we):
        arr = da.pad(arr, ((0, 0), (0, he - arr.shape[1]), (0, we - arr.shape[2])), mode="edge")
    return EdsMaps(arr, names, f, true)


def register_eds(sem: da.Array, eds: EdsMaps, *, tile: int = 2048, upsample_factor: int = 20,
                 lowpass: float = 1.0, min_quality: float = 0.3,
                 max_deviation: float = 2.0) -> ShiftField:
    """Estimate the EDS shift per ``tile`` (SEM px) and aggregate it into a smooth field.

    The SEM image is binned (mean) onto the EDS grid; each tile pair goes through
    :func:`semdask.labelling.registration.estimate_shift` (one task per tile); tiles are combined by
    :func:`semdask.labelling.registration.aggregate_shifts` (``max_deviation`` in SEM px).
    """
    f = eds.factor
    he, we = eds.data.shape[1:]
    pad = ((0, he * f - sem.shape[0]), (0, we * f - sem.shape[1]))
    te = max(16, tile // f)
    x = da.pad(sem.astype(np.float32), pad, mode="edge").rechunk(te * f)
    binned = da.coarsen(np.mean, x, {0: f, 1: f})
    ys, xs = chunk_grid(he, te, te // 2), chunk_grid(we, te, te // 2)
    oy, ox = np.cumsum((0, *ys)), np.cumsum((0, *xs))
    tasks = [dask.delayed(estimate_shift)(binned[oy[i]:oy[i + 1], ox[j]:ox[j + 1]],
                                          eds.data[:, oy[i]:oy[i + 1], ox[j]:ox[j + 1]],
                                          upsample_factor=upsample_factor, lowpass=lowpass)
             for i in range(len(ys)) for j in range(len(xs))]
    res = np.array(dask.compute(*tasks), np.float64).reshape(len(ys), len(xs), 3)
    raw = res[..., :2] * f
    fld, ok = aggregate_shifts(raw, res[..., 2], min_quality=min_quality,
                               max_deviation=max_deviation)
    centres = ((oy[:-1] + oy[1:]) * f / 2, (ox[:-1] + ox[1:]) * f / 2)
    out = ShiftField(f, te * f, centres, fld, raw, res[..., 2], ok)
    log.info("EDS registration: %d/%d tiles kept, mean shift (dy, dx) = (%.2f, %.2f) SEM px",
             ok.sum(), ok.size, *out.mean)
    return out


def upsample_eds(eds: EdsMaps, shift: ShiftField | None, chunks: tuple[tuple[int, ...], ...]
                 ) -> da.Array:
    """EDS maps on SEM pixels (c, y, x) float32 with SEM ``chunks`` (multiples of the factor
    but the last), shift-corrected and bilinear (:func:`resample_block`)."""
    f = eds.factor
    shift = shift or ShiftField.zero((sum(chunks[0]), sum(chunks[1])), f)
    de = math.ceil(shift.max_abs / f) + 2
    ech = [(*(c // f for c in ch[:-1]), n - sum(c // f for c in ch[:-1]))
           for ch, n in zip(chunks, eds.data.shape[1:], strict=True)]
    if min(min(c) for c in ech) < de:
        raise InputError("chunk", expected=f"chunks of at least {de * f} px",
                         got=f"chunks {chunks}", fix="use larger --chunks")
    x = eds.data.rechunk((eds.data.shape[0], *ech))
    offs = [np.cumsum((0, *c)) for c in chunks]
    eoffs = [np.cumsum((0, *c)) for c in ech]

    def task(block: np.ndarray, block_id: tuple[int, ...] | None = None) -> np.ndarray:
        assert block_id is not None
        iy, ix = block_id[1:]
        return resample_block(block, eds_origin=(eoffs[0][iy] - de, eoffs[1][ix] - de),
                              out_origin=(offs[0][iy], offs[1][ix]),
                              out_shape=(chunks[0][iy], chunks[1][ix]), factor=f,
                              field=shift.field, centres=shift.centres)

    return da.map_overlap(task, x, depth={0: 0, 1: de, 2: de}, boundary="nearest",
                          trim=False, chunks=((x.shape[0],), *chunks), dtype=np.float32,
                          meta=_F32, token="semdask-eds-upsample")

