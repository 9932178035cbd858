"""Synthetic SEM mosaics of Ni/YSZ electrodes (pore, Ni, NiO, YSZ) with ground truth and EDS.

Every pixel is a pure function of its *global* coordinates and the seed: particles live in
hashed cells, smooth fields are hashed value noise, the PSF is applied with a margin and
cropped, and detector noise comes from a counter-based RNG keyed by the global index of fixed
256-px blocks. A region therefore renders identically whatever chunk it is rendered in, and
:func:`synthetic_mosaic` can build arbitrarily large mosaics lazily, chunk by chunk.

Microstructure (kernels in :mod:`semdask.synthetic.microstructure`): YSZ is a band around the median
contour of a two-octave value-noise field (a connected, fine-grained network: Worley grains
with per-grain grey and dark boundaries, and a bright SEM edge effect next to pores); pores
are the excursions outside the band (dark, irregular); Ni is a union of large, smooth, rounded
(elliptical) particles on a jittered cell grid; NiO grows inwards from the Ni surface as rough
rims, with some particles fully oxidised (``nio_fraction`` ~ oxidised share of the Ni, 0 =
none). Ni and YSZ share grey levels; texture and shape tell them apart, as in the paper. Image
formation: PSF blur, slow drift, tile gain/offset steps, then the paper's eq. 2 noise
``Poisson(I*C)/C + N(0, sigma)`` (Poisson term in its normal approximation, variance ``I/C``,
so each noise block draws a fixed number of variates). EDS (Ni, O, Zr): phase signal, 4x
binned, blurred, shifted, noisy.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from semdask.errors import InputError
from semdask.synthetic.microstructure import hash_uniform, microstructure, value_noise

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

    #: class names of ``truth`` and their display colours (written into the labels group)
    classes: tuple[str, ...] = field(default=(), init=False)
    colours: tuple[tuple[int, int, int, int], ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(PHASES))
        object.__setattr__(self, "colours", tuple(tuple(c) for c in COLOURS))

    @property
    def eds_shift_px(self) -> tuple[float, float]:
        """True (dy, dx) displacement of EDS features relative to the image, in EDS pixels."""
        return (self.params.eds_shift[0] / 4, self.params.eds_shift[1] / 4)


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
        img = img * (1 + p.drift * (2 * value_noise(seed, 5, y0, x0, h, w, p.drift_scale) - 1))
    if p.tile_step > 0:
        ty = np.arange(y0, y0 + h) // p.tile_size
        tx = np.arange(x0, x0 + w) // p.tile_size
        gy, gx = np.meshgrid(np.unique(ty), np.unique(tx), indexing="ij")
        gain = 1 + p.tile_step * (2 * hash_uniform(seed, 6, gy, gx) - 1)
        off = 0.5 * p.tile_step * (2 * hash_uniform(seed, 7, gy, gx) - 1)
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
    truth, clean = microstructure(y0 - m, x0 - m, h + 2 * m, w + 2 * m, seed, p)
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
    truth, _ = microstructure(*win, seed, p, grey=False)
    return _form_eds(truth, y0, x0, h, w, seed, p)


def _chunk(kind: str, y0: int, x0: int, h: int, w: int, seed: int, p: SynthParams) -> Any:
    """One mosaic chunk; each output renders only what it needs (truth and EDS skip the grey)."""
    if kind == "image":
        return render_region(y0, x0, h, w, seed=seed, params=p)[0]
    if kind == "truth":
        return microstructure(y0, x0, h, w, seed, p, grey=False)[0]
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
