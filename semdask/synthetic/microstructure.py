"""Phase layout of the synthetic Ni/YSZ microstructures (pure numpy kernels).

Every value is a pure function of *global* pixel coordinates and the seed (hashed cells,
hashed value noise), so any region renders identically whatever chunk it is rendered in.
:mod:`semdask.synthetic` forms the SEM image and EDS maps from what these kernels return.

YSZ is a band around the median contour of a two-octave value-noise field (a connected,
fine-grained network: Worley grains with per-grain grey and dark boundaries, and a bright SEM
edge effect next to pores); pores are the excursions outside the band; Ni is a union of large,
smooth, rounded (elliptical) particles on a jittered cell grid; NiO grows inwards from the Ni
surface as rough rims, with some particles fully oxidised.

* :func:`hash_uniform` -- counter-based hash ``(seed, stream, iy, ix) -> [0, 1)``;
* :func:`value_noise` -- smooth hashed value noise on a lattice;
* :func:`microstructure` -- truth (class ids) and clean grey image of a region.

Examples
--------
>>> from semdask.synthetic.sem import SynthParams
>>> truth, grey = microstructure(0, 0, 32, 48, 1, SynthParams())
>>> truth.shape, truth.dtype, grey.dtype, int(truth.max()) <= 3
((32, 48), dtype('uint8'), dtype('float32'), True)
>>> bool((microstructure(8, 16, 8, 8, 1, SynthParams(), grey=False)[0]
...       == truth[8:16, 16:24]).all())
True
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from semdask.synthetic.sem import SynthParams

__all__ = ["hash_uniform", "microstructure", "value_noise"]

_W = 0.15  # width of the per-particle oxidation ramp in nio_fraction
_M1, _M2, _K1, _K2 = (np.uint64(c) for c in (
    0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93))


# ----------------------------------------------------------------------------- hashing / fields
def hash_uniform(seed: int, stream: int, iy: Any, ix: Any) -> np.ndarray:
    """Hash (seed, stream, iy, ix) -> uniform float64 in [0, 1), vectorised, platform-exact."""
    with np.errstate(over="ignore"):
        key = np.uint64((seed * 1009 + stream) & 0xFFFFFFFFFFFFFFFF)
        h = np.asarray(iy, np.int64).astype(np.uint64) * _K1 + key * _K2
        h = _mix(h) ^ (np.asarray(ix, np.int64).astype(np.uint64) * _K2)
        h = _mix(h + key)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _mix(z: np.ndarray) -> np.ndarray:  # splitmix64 finaliser
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _axis(o: int, n: int, lat: float) -> tuple[np.ndarray, np.ndarray]:
    f = np.arange(o, o + n, dtype=np.float64) / lat
    i = np.floor(f).astype(np.int64)
    t = f - i
    return i, (t * t * (3 - 2 * t)).astype(np.float32)


def value_noise(seed: int, stream: int, y0: int, x0: int, h: int, w: int, lat: float) -> Any:
    """Smooth hashed value noise in [0, 1] with lattice spacing ``lat`` px, shape (h, w)."""
    iy, ty = _axis(y0, h, lat)
    ix, tx = _axis(x0, w, lat)
    ly, lx = np.arange(iy[0], iy[-1] + 2), np.arange(ix[0], ix[-1] + 2)
    grid = hash_uniform(seed, stream, ly[:, None], lx[None, :]).astype(np.float32)
    a, b = grid[:, ix - lx[0]], grid[:, ix - lx[0] + 1]
    rows = a + (b - a) * tx
    r0, r1 = rows[iy - ly[0]], rows[iy - ly[0] + 1]
    r1 -= r0
    r1 *= ty[:, None]
    r1 += r0
    return r1


@lru_cache(maxsize=64)
def _band(ysz_share: float) -> tuple[float, float]:
    """Levels (lo, hi) of the two-octave field holding ``ysz_share`` of it around the median.

    Calibrated once on a fixed sample; the band around the median contour is a connected
    network (YSZ), the low and high excursions outside it are the pores.
    """
    f = 0.7 * value_noise(7, 1, 0, 0, 1024, 1024, 16.0)
    f += 0.3 * value_noise(7, 2, 0, 0, 1024, 1024, 6.0)
    lo, hi = np.quantile(f, [(1 - ysz_share) / 2, (1 + ysz_share) / 2])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- microstructure
def _ni_particles(seed: int, p: SynthParams, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Ni particles touching the region: rows (cy, cx, r, aspect, angle, u_grey, u_ox)."""
    r0, r1 = p.ni_radius
    cell = max(2.0 * r1, 8.0)
    mean_area = math.pi * (r0 * r0 + r0 * r1 + r1 * r1) / 3
    prob = min(1.0, -math.log(1 - p.ni_fraction) * cell * cell / mean_area * 0.82)
    reach = r1 * 1.25 + 1
    cy = np.arange(math.floor((y0 - reach) / cell), math.floor((y0 + h + reach) / cell) + 1)
    cx = np.arange(math.floor((x0 - reach) / cell), math.floor((x0 + w + reach) / cell) + 1)
    gy, gx = np.meshgrid(cy, cx, indexing="ij")
    u = [hash_uniform(seed, 10 + k, gy, gx).ravel() for k in range(8)]
    keep = u[0] < prob
    cols = [(gy.ravel() + u[1]) * cell, (gx.ravel() + u[2]) * cell, r0 + (r1 - r0) * u[3],
            1 + 0.45 * u[4], np.pi * u[5], u[6], u[7]]
    return np.stack([c[keep] for c in cols], axis=1)


def _ysz_grains(seed: int, g: int, y0: int, x0: int, h: int, w: int) -> Any:
    """Per-grain uniform value of a Worley (jittered-grid Voronoi) tessellation, shape (h, w)."""
    cy0, cx0 = y0 // g, x0 // g
    ncy, ncx = -(-(y0 + h) // g) - cy0, -(-(x0 + w) // g) - cx0
    gy, gx = np.meshgrid(np.arange(cy0 - 1, cy0 + ncy + 1), np.arange(cx0 - 1, cx0 + ncx + 1),
                         indexing="ij")
    jy, jx, gv = (hash_uniform(seed, 20 + k, gy, gx).astype(np.float32) for k in range(3))
    loc = np.arange(g, dtype=np.float32) + 0.5
    val = np.empty((g, g, ncy, ncx), np.float32)  # (local y, local x, cell y, cell x)
    hg = (g + 1) // 2
    # nearest seed among the 2 x 2 cells on the pixel's side of its cell (jittered grid)
    for ys, oys in ((slice(0, hg), (-1, 0)), (slice(hg, g), (0, 1))):
        for xs, oxs in ((slice(0, hg), (-1, 0)), (slice(hg, g), (0, 1))):
            ly, lx = loc[ys, None, None, None], loc[None, xs, None, None]
            best = np.full((len(loc[ys]), len(loc[xs]), ncy, ncx), np.inf, np.float32)
            v, m = val[ys, xs], np.empty(best.shape, bool)
            for oy in oys:
                for ox in oxs:
                    s = (slice(1 + oy, 1 + oy + ncy), slice(1 + ox, 1 + ox + ncx))
                    d2 = (ly - (oy + jy[s]) * g) ** 2 + (lx - (ox + jx[s]) * g) ** 2
                    np.less(d2, best, out=m)
                    np.minimum(d2, best, out=best)
                    np.copyto(v, gv[s], where=m)
    val = val.transpose(2, 0, 3, 1)
    oy, ox = y0 - cy0 * g, x0 - cx0 * g
    return val.reshape(ncy * g, ncx * g)[oy:oy + h, ox:ox + w]


def microstructure(y0: int, x0: int, h: int, w: int, seed: int, p: SynthParams,
                    grey: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Truth (uint8) and, if ``grey``, the clean grey image (float32) of a region."""
    lo, hi = _band(round(1 - p.porosity / (1 - p.ni_fraction), 6))
    pf = 0.7 * value_noise(seed, 1, y0, x0, h, w, p.pore_scale / 2.25)
    pf += 0.3 * value_noise(seed, 2, y0, x0, h, w, p.pore_scale / 6)
    pore = pf < lo
    pore |= pf > hi
    # Ni particles: signed distance (px, < 0 inside) of the union of ellipses; the nearest
    # particle's oxidation depth (px) and grey offset are carried along per pixel.
    parts = _ni_particles(seed, p, y0, x0, h, w)
    f = p.nio_fraction
    rad, uox = parts[:, 2], parts[:, 6]
    # oxidised share per particle: a ramp of width W past the particle's random onset, so
    # particles are intact, rimmed or fully NiO; F is chosen so that the mean share is f
    c = _W * (1 - _W) / 2
    F = (math.sqrt(2 * c * f) if f <= c else 1 - math.sqrt(2 * c * (1 - f)) if f >= 1 - c
         else f * (1 - _W) + _W / 2)
    share = np.clip((F - (1 - _W) * uox) / _W, 0, 1)
    thr = rad * np.where(share >= 1, 3.0, 1 - np.sqrt(np.clip(1 - share, 0, 1)))
    sdf = np.full((h, w), np.inf, np.float32)
    ox_f, off_f = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    rows = np.column_stack([parts[:, :5], 0.06 * (parts[:, 5] - 0.5), thr]).tolist()
    for cy, cx, r, asp, ang, ug, th in rows:
        e = r * math.sqrt(asp) + 1
        ya, yb = max(math.floor(cy - e), y0), min(math.ceil(cy + e), y0 + h)
        xa, xb = max(math.floor(cx - e), x0), min(math.ceil(cx + e), x0 + w)
        if ya >= yb or xa >= xb:
            continue
        dy, dx = np.arange(ya, yb) + (0.5 - cy), np.arange(xa, xb) + (0.5 - cx)
        cs, sn, sa = math.cos(ang), math.sin(ang), math.sqrt(asp)
        uu = (dy * (cs / sa))[:, None] + (dx * (sn / sa))[None, :]
        vv = (dx * (cs * sa))[None, :] - (dy * (sn * sa))[:, None]
        d = (np.hypot(uu, vv) - r).astype(np.float32)
        box = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
        m = d < sdf[box]
        np.copyto(sdf[box], d, where=m)
        np.copyto(ox_f[box], th, where=m)
        np.copyto(off_f[box], ug, where=m)
    ni = sdf < 0
    truth = np.full((h, w), 3, np.uint8)
    np.copyto(truth, 0, where=pore)
    np.copyto(truth, 1, where=ni)
    # oxidation: rough front growing inwards from the Ni surface + nucleated islands
    rough = value_noise(seed, 3, y0, x0, h, w, 7.0)
    nio = rough > 1 - 0.12 * f
    nio |= -sdf < ox_f * (0.4 + 1.2 * rough)
    nio &= ni
    np.copyto(truth, 2, where=nio)
    if not grey:
        return truth, None
    img = np.asarray(p.grey, np.float32)[truth]
    gv = _ysz_grains(seed, int(p.ysz_grain), y0, x0, h, w)
    bnd = np.zeros((h, w), bool)  # grain boundaries: the grain value changes
    np.not_equal(gv[1:], gv[:-1], out=bnd[:-1])
    bnd[:, :-1] |= gv[:, 1:] != gv[:, :-1]
    gv -= 0.5
    gv *= 0.18
    gv -= 0.14 * bnd
    np.add(img, gv, out=img, where=truth == 3)
    off_f -= np.clip(sdf, -10, 0) * np.float32(0.0015)  # slightly brighter cores
    np.add(img, off_f, out=img, where=ni)
    if f > 0:
        # NiO: darker than Ni, mottled by its nano-porosity (dark speckles)
        tex = value_noise(seed, 4, y0, x0, h, w, 2.5)
        tex -= 0.5
        tex *= 0.22
        tex -= 0.10 * (value_noise(seed, 10, y0, x0, h, w, 1.5) > 0.78)
        np.add(img, tex, out=img, where=truth == 2)
    edge = np.minimum(pf - lo, hi - pf)  # > 0 in the YSZ band, ~ distance to the pores
    edge = np.clip(1 - edge * (1 / 0.03), 0, 1)  # SEM edge effect: brighter at pore edges
    edge *= 0.07
    np.add(img, edge, out=img, where=truth == 3)
    pf -= 0.5 * (lo + hi)
    pf *= 0.05
    np.add(img, pf, out=img, where=truth == 0)
    return truth, img


