"""Synthetic SEM mosaics of Ni/YSZ electrodes (pore, Ni, NiO, YSZ) with ground truth and EDS.

Every pixel is a pure function of its *global* coordinates and the seed: particles live in
hashed cells, smooth fields are hashed value noise, the PSF is applied with a margin and
cropped, and detector noise comes from a counter-based RNG keyed by the global index of fixed
256-px blocks. A region therefore renders identically whatever chunk it is rendered in, and
:func:`synthetic_mosaic` can build arbitrarily large mosaics lazily, chunk by chunk.

Microstructure: YSZ is a band around the median contour of a two-octave value-noise field
(a connected, fine-grained network: Worley grains with per-grain grey and dark boundaries, and
a bright SEM edge effect next to pores); pores are the excursions outside the band (dark,
irregular); Ni is a union of large, smooth, rounded (elliptical) particles on a jittered cell
grid; NiO grows inwards from the Ni surface as rough rims, with some particles fully
oxidised (``nio_fraction`` ~ oxidised share of the Ni, 0 = none). Ni and YSZ share grey
levels; texture and shape tell them apart, as in the paper. Image formation: PSF blur, slow
drift, tile gain/offset steps, then the paper's eq. 2 noise ``Poisson(I*C)/C + N(0, sigma)``
(Poisson term in its normal approximation, variance ``I/C``, so each noise block draws a fixed
number of variates). EDS (Ni, O, Zr): phase signal, 4x binned, blurred, shifted, noisy.

Examples
--------
>>> img, truth = render_region(0, 0, 64, 96, seed=1)
>>> img.shape, img.dtype, truth.shape, int(truth.max()) <= 3
((64, 96), dtype('uint8'), (64, 96), True)
>>> bool((render_region(16, 32, 16, 16, seed=1)[0] == img[16:32, 32:48]).all())
True
>>> render_eds(0, 0, 16, 24, seed=1).shape
(3, 16, 24)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

__all__ = [
    "COLOURS",
    "PHASES",
    "SynthParams",
    "SyntheticMosaic",
    "render_eds",
    "render_region",
    "synthetic_mosaic",
]

PHASES: tuple[str, ...] = ("pore", "Ni", "NiO", "YSZ")
COLOURS: tuple[tuple[int, int, int, int], ...] = (
    (20, 20, 20, 255),  # pore: near black
    (230, 185, 40, 255),  # Ni: gold
    (60, 170, 70, 255),  # NiO: green
    (110, 140, 190, 255),  # YSZ: blue-grey
)
# Relative EDS signal (Ni, O, Zr) per phase (pore, Ni, NiO, YSZ).
_EDS_TABLE = np.array(
    [[0.02, 1.00, 0.75, 0.02], [0.08, 0.02, 0.85, 0.60], [0.02, 0.01, 0.01, 0.95]], np.float32
)
_NOISE_BLOCK = 256
_W = 0.15  # width of the per-particle oxidation ramp in nio_fraction
_M1, _M2, _K1, _K2 = (np.uint64(c) for c in (
    0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93))


@dataclass(frozen=True)
class SynthParams:
    """Parameters of the synthetic electrode and of image formation (lengths in pixels).

    Each field is documented by its ``#:`` comment; invalid values raise
    :class:`~semdask.errors.InputError`. Fractions are area fractions of the image.

    Examples
    --------
    >>> SynthParams(nio_fraction=0.5).porosity
    0.3
    """

    pixel_size_um: float = 0.04458  #: pixel size in µm (the paper's)
    nio_fraction: float = 0.25  #: share of the Ni oxidised to NiO, [0, 1] (oxidation time)
    porosity: float = 0.30  #: target pore fraction
    ni_fraction: float = 0.33  #: target Ni + NiO fraction
    ni_radius: tuple[float, float] = (9.0, 20.0)  #: min, max Ni particle radius (px)
    ysz_grain: int = 8  #: YSZ grain size (Worley cell edge, px)
    pore_scale: float = 56.0  #: length scale of the pore / YSZ-network field (px)
    #: mean clean grey of pore, Ni, NiO, YSZ in [0, 1] (Ni and YSZ overlap; texture differs)
    grey: tuple[float, float, float, float] = (0.10, 0.58, 0.36, 0.55)
    noise: float = 0.015  #: sigma of the additive Gaussian noise of eq. 2 (grey units)
    photons: float = 1000.0  #: C of eq. 2 (counts at full scale); 0 disables Poisson noise
    blur: float = 1.0  #: Gaussian PSF sigma (px); 0 disables
    drift: float = 0.05  #: relative amplitude of the slow brightness drift
    drift_scale: float = 6000.0  #: length scale of the drift (px)
    tile_size: int = 2048  #: acquisition tile edge (px)
    tile_step: float = 0.03  #: relative tile-to-tile gain step (offset step: half of it)
    #: true EDS misregistration (dy, dx) in image px: features appear shifted by this / 4 EDS px
    eds_shift: tuple[int, int] = (3, -2)
    eds_blur: float = 8.0  #: EDS interaction-volume sigma (image px)
    eds_counts: float = 40.0  #: X-ray counts per EDS pixel at full signal (EDS noise)

    def __post_init__(self) -> None:
        r = self.ni_radius
        checks: list[tuple[str, bool, str]] = [
            ("pixel_size_um", self.pixel_size_um > 0, "> 0"),
            ("nio_fraction", 0 <= self.nio_fraction <= 1, "in [0, 1]"),
            ("porosity", 0 < self.porosity < 0.6, "in (0, 0.6)"),
            ("ni_fraction", 0 < self.ni_fraction < 0.6
             and 0.05 <= 1 - self.porosity / (1 - self.ni_fraction) <= 0.95,
             "in (0, 0.6), with porosity / (1 - ni_fraction) in [0.05, 0.95]"),
            ("ni_radius", len(r) == 2 and 2 <= r[0] <= r[1] <= 200, "(min, max), 2 <= min <= max"),
            ("ysz_grain", 3 <= int(self.ysz_grain) == self.ysz_grain <= 64, "an int in [3, 64]"),
            ("pore_scale", 4 <= self.pore_scale <= 1000, "in [4, 1000]"),
            ("grey", len(self.grey) == 4 and all(0 <= g <= 1 for g in self.grey), "4 in [0, 1]"),
            ("noise", 0 <= self.noise <= 1, "in [0, 1]"),
            ("photons", self.photons >= 0, ">= 0"),
            ("blur", 0 <= self.blur <= 20, "in [0, 20]"),
            ("drift", 0 <= self.drift < 1, "in [0, 1)"),
            ("drift_scale", self.drift_scale > 0, "> 0"),
            ("tile_size", int(self.tile_size) == self.tile_size >= 16, "an int >= 16"),
            ("tile_step", 0 <= self.tile_step < 0.5, "in [0, 0.5)"),
            ("eds_shift", len(self.eds_shift) == 2
             and all(int(s) == s and abs(s) <= 64 for s in self.eds_shift), "2 ints, |s| <= 64"),
            ("eds_blur", 0 <= self.eds_blur <= 64, "in [0, 64]"),
            ("eds_counts", self.eds_counts > 0, "> 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(f"SynthParams.{name}", expected=expected,
                                 got=repr(getattr(self, name)),
                                 fix=f"pass a valid {name} (see SynthParams docs)")

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of the parameters (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class SyntheticMosaic:
    """A lazily built synthetic mosaic: dask arrays ``image`` uint8 (y, x), ``truth`` uint8
    (y, x) class ids (indices into :data:`PHASES`), ``eds`` float32 (3, ceil(y/4), ceil(x/4))
    maps Ni, O, Zr (pixel 4 x ``pixel_size_um``), plus the ``params`` and ``seed`` used."""

    image: Any
    truth: Any
    eds: Any
    pixel_size_um: float
    params: SynthParams = field(default_factory=SynthParams)
    seed: int = 0

    @property
    def eds_shift_px(self) -> tuple[float, float]:
        """True (dy, dx) displacement of EDS features relative to the image, in EDS pixels."""
        return (self.params.eds_shift[0] / 4, self.params.eds_shift[1] / 4)


# ----------------------------------------------------------------------------- hashing / fields
def _uniform(seed: int, stream: int, iy: Any, ix: Any) -> np.ndarray:
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


def _value_noise(seed: int, stream: int, y0: int, x0: int, h: int, w: int, lat: float) -> Any:
    """Smooth hashed value noise in [0, 1] with lattice spacing ``lat`` px, shape (h, w)."""
    iy, ty = _axis(y0, h, lat)
    ix, tx = _axis(x0, w, lat)
    ly, lx = np.arange(iy[0], iy[-1] + 2), np.arange(ix[0], ix[-1] + 2)
    grid = _uniform(seed, stream, ly[:, None], lx[None, :]).astype(np.float32)
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
    f = 0.7 * _value_noise(7, 1, 0, 0, 1024, 1024, 16.0)
    f += 0.3 * _value_noise(7, 2, 0, 0, 1024, 1024, 6.0)
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
    u = [_uniform(seed, 10 + k, gy, gx).ravel() for k in range(8)]
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
    jy, jx, gv = (_uniform(seed, 20 + k, gy, gx).astype(np.float32) for k in range(3))
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


def _microstructure(y0: int, x0: int, h: int, w: int, seed: int, p: SynthParams,
                    grey: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Truth (uint8) and, if ``grey``, the clean grey image (float32) of a region."""
    lo, hi = _band(round(1 - p.porosity / (1 - p.ni_fraction), 6))
    pf = 0.7 * _value_noise(seed, 1, y0, x0, h, w, p.pore_scale / 2.25)
    pf += 0.3 * _value_noise(seed, 2, y0, x0, h, w, p.pore_scale / 6)
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
    rough = _value_noise(seed, 3, y0, x0, h, w, 7.0)
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
        tex = _value_noise(seed, 4, y0, x0, h, w, 2.5)
        tex -= 0.5
        tex *= 0.22
        tex -= 0.10 * (_value_noise(seed, 10, y0, x0, h, w, 1.5) > 0.78)
        np.add(img, tex, out=img, where=truth == 2)
    edge = np.minimum(pf - lo, hi - pf)  # > 0 in the YSZ band, ~ distance to the pores
    edge = np.clip(1 - edge * (1 / 0.03), 0, 1)  # SEM edge effect: brighter at pore edges
    edge *= 0.07
    np.add(img, edge, out=img, where=truth == 3)
    pf -= 0.5 * (lo + hi)
    pf *= 0.05
    np.add(img, pf, out=img, where=truth == 0)
    return truth, img


# ----------------------------------------------------------------------------- image formation
def _normal(seed: int, stream: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Standard normals from a counter-based RNG keyed by global fixed-block index."""
    b = _NOISE_BLOCK
    out = np.empty((h, w), np.float32)
    for by in range(y0 // b, (y0 + h - 1) // b + 1):
        for bx in range(x0 // b, (x0 + w - 1) // b + 1):
            key = [seed, stream] + [2 * v if v >= 0 else -2 * v - 1 for v in (by, bx)]
            z = np.random.default_rng(key).standard_normal((b, b), dtype=np.float32)
            ya, yb = max(by * b, y0), min(by * b + b, y0 + h)
            xa, xb = max(bx * b, x0), min(bx * b + b, x0 + w)
            out[ya - y0:yb - y0, xa - x0:xb - x0] = z[ya - by * b:yb - by * b,
                                                      xa - bx * b:xb - bx * b]
    return out


def _image_margin(p: SynthParams) -> int:
    return int(4 * p.blur + 0.5) + 2


def _form_image(clean: np.ndarray, y0: int, x0: int, h: int, w: int, seed: int,
                p: SynthParams) -> np.ndarray:
    """Blur (margin-padded ``clean``), crop, drift, tile steps, eq. 2 noise -> uint8."""
    m = _image_margin(p)
    if p.blur > 0:
        clean = ndi.gaussian_filter(clean, p.blur, truncate=4.0)
    img = clean[m:m + h, m:m + w]
    if p.drift > 0:
        img = img * (1 + p.drift * (2 * _value_noise(seed, 5, y0, x0, h, w, p.drift_scale) - 1))
    if p.tile_step > 0:
        ty = np.arange(y0, y0 + h) // p.tile_size
        tx = np.arange(x0, x0 + w) // p.tile_size
        gy, gx = np.meshgrid(np.unique(ty), np.unique(tx), indexing="ij")
        gain = 1 + p.tile_step * (2 * _uniform(seed, 6, gy, gx) - 1)
        off = 0.5 * p.tile_step * (2 * _uniform(seed, 7, gy, gx) - 1)
        iy, ix = np.searchsorted(gy[:, 0], ty), np.searchsorted(gx[0], tx)
        img = img * gain.astype(np.float32)[iy][:, ix] + off.astype(np.float32)[iy][:, ix]
    var = np.float32(p.noise**2) + (np.maximum(img, 0) / p.photons if p.photons > 0 else 0)
    img = img + np.sqrt(var) * _normal(seed, 8, y0, x0, h, w)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _eds_window(y0: int, x0: int, h: int, w: int, p: SynthParams) -> tuple[int, int, int, int]:
    """Image-pixel window (y, x, h, w) whose truth an EDS region needs (shift + blur margin)."""
    me = 4 * (int(p.eds_blur + 0.5) + 1)  # blur sigma/4 EDS px, 4 sigma, in image px
    return (4 * y0 - p.eds_shift[0] - me, 4 * x0 - p.eds_shift[1] - me, 4 * h + 2 * me,
            4 * w + 2 * me)


def _form_eds(truth: np.ndarray, y0: int, x0: int, h: int, w: int, seed: int,
              p: SynthParams) -> np.ndarray:
    """EDS maps from the truth of :func:`_eds_window`: 4x bin, blur, crop, counting noise."""
    me = (truth.shape[0] - 4 * h) // 8
    hh, ww = truth.shape[0] // 4, truth.shape[1] // 4
    maps = np.empty((3, hh, ww), np.float32)
    for c in range(3):
        v = _EDS_TABLE[c][truth]
        v = v[:, 0::4] + v[:, 1::4] + v[:, 2::4] + v[:, 3::4]
        np.multiply(v[0::4] + v[1::4] + v[2::4] + v[3::4], np.float32(1 / 16), out=maps[c])
    if p.eds_blur > 0:
        maps = ndi.gaussian_filter(maps, (0, p.eds_blur / 4, p.eds_blur / 4), truncate=4.0)
    maps = maps[:, me:me + h, me:me + w]
    z = np.stack([_normal(seed, 9 + c, y0, x0, h, w) for c in range(3)])
    out = maps + np.sqrt(np.maximum(maps, 0) / p.eds_counts) * z
    return np.maximum(out, 0).astype(np.float32)


def _check(h: int, w: int, seed: int, params: SynthParams | None) -> SynthParams:
    if h <= 0 or w <= 0:
        raise InputError("region", expected="positive h and w", got=f"h={h}, w={w}",
                         fix="pass a non-empty region")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError("seed", expected="an int >= 0", got=repr(seed), fix="e.g. seed=0")
    return params if params is not None else SynthParams()


def render_region(y0: int, x0: int, h: int, w: int, *, seed: int = 0,
                  params: SynthParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render image (uint8) and truth (uint8 class ids) of global region [y0:y0+h, x0:x0+w].

    Deterministic in global coordinates: a pixel is the same whatever region contains it.
    """
    p = _check(h, w, seed, params)
    m = _image_margin(p)
    truth, clean = _microstructure(y0 - m, x0 - m, h + 2 * m, w + 2 * m, seed, p)
    assert clean is not None
    return _form_image(clean, y0, x0, h, w, seed, p), truth[m:m + h, m:m + w].copy()


def render_eds(y0: int, x0: int, h: int, w: int, *, seed: int = 0,
               params: SynthParams | None = None) -> np.ndarray:
    """Render EDS maps (Ni, O, Zr) float32 (3, h, w); region given in EDS pixels (= 4 image px).

    EDS pixel (i, j) integrates image pixels [4i, 4i+4) x [4j, 4j+4) displaced by
    ``-params.eds_shift`` (so features appear shifted by +eds_shift/4 EDS px), blurred by the
    interaction volume and with counting noise.
    """
    p = _check(h, w, seed, params)
    win = _eds_window(y0, x0, h, w, p)
    truth, _ = _microstructure(*win, seed, p, grey=False)
    return _form_eds(truth, y0, x0, h, w, seed, p)


def _chunk(kind: str, y0: int, x0: int, h: int, w: int, seed: int, p: SynthParams) -> Any:
    """One mosaic chunk; each output renders only what it needs (truth and EDS skip the grey)."""
    if kind == "image":
        return render_region(y0, x0, h, w, seed=seed, params=p)[0]
    if kind == "truth":
        return _microstructure(y0, x0, h, w, seed, p, grey=False)[0]
    return render_eds(y0 // 4, x0 // 4, -(-h // 4), -(-w // 4), seed=seed, params=p)


def synthetic_mosaic(shape: tuple[int, int], *, seed: int = 0, chunk: int = 2048,
                     params: SynthParams | None = None) -> SyntheticMosaic:
    """Build a lazy synthetic mosaic (dask arrays, one task per ``chunk`` x ``chunk`` block).

    Parameters
    ----------
    shape : (int, int)
        Mosaic (y, x) size in pixels.
    seed : int
        Seed; the same seed gives the same pixels whatever ``chunk``.
    chunk : int
        Chunk edge (a multiple of 4); EDS chunks are ``chunk // 4``.
    params : SynthParams, optional

    Returns
    -------
    SyntheticMosaic
        ``image`` uint8 (y, x), ``truth`` uint8 (y, x), ``eds`` float32 (3, ceil(y/4), ceil(x/4)).

    Examples
    --------
    >>> m = synthetic_mosaic((100, 200), seed=3, chunk=64)
    >>> m.image.chunks, m.eds.shape
    (((64, 36), (64, 64, 64, 8)), (3, 25, 50))
    """
    import dask
    import dask.array as da

    if len(shape) != 2 or min(shape) <= 0:
        raise InputError("shape", expected="(h, w) with h, w > 0", got=repr(shape),
                         fix="e.g. shape=(8192, 8192)")
    if int(chunk) != chunk or chunk < 16 or chunk % 4:
        raise InputError("chunk", expected="an int >= 16, multiple of 4", got=repr(chunk),
                         fix="e.g. chunk=2048")
    H, W = (int(s) for s in shape)
    p = _check(H, W, seed, params)

    def grid(kind: str, dtype: Any) -> Any:
        rows = []
        for y0 in range(0, H, chunk):
            row = []
            for x0 in range(0, W, chunk):
                h, w = min(chunk, H - y0), min(chunk, W - x0)
                shp = (3, -(-h // 4), -(-w // 4)) if kind == "eds" else (h, w)
                d = dask.delayed(_chunk, pure=True)(kind, y0, x0, h, w, int(seed), p)
                row.append(da.from_delayed(d, shp, dtype=dtype))
            rows.append(row)
        return da.block(rows)

    return SyntheticMosaic(grid("image", np.uint8), grid("truth", np.uint8),
                           grid("eds", np.float32), p.pixel_size_um, p, int(seed))
