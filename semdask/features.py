"""Kernels of the EDS-guided labelling (pure numpy/scipy/skimage: one block in, one out).

* :func:`features_block` -- Ilastik-style multiscale pixel features of a (c, h, w) block:
  raw intensity, Gaussian, Laplacian of Gaussian, Gaussian gradient magnitude, difference
  of Gaussians, structure-tensor and Hessian eigenvalues. Every filter chain reaches at most
  ``FeatureSpec.depth = ceil(4 * max(sigmas))`` px (explicit ``radius=`` on each Gaussian),
  so a block padded by ``depth`` gives exactly the global result on its core.
* :func:`estimate_shift` -- sub-pixel misregistration of EDS maps against an SEM tile
  (phase cross-correlation with a least-squares "SEM predicted from EDS" proxy);
  :func:`aggregate_shifts` turns tile estimates into a robust, smooth shift field and
  (a :class:`ShiftField`) and :func:`resample_block` upsamples EDS onto SEM pixels through
  that field (bilinear).
* :func:`predict_block` -- class probabilities of a feature block from any classifier.
* :func:`parse_annotations` (CSV / GeoJSON) and :func:`rasterise` -- points, strokes and
  polygons to a label block; :func:`synthetic_scribbles` -- sparse scribbles drawn inside
  the classes of a truth map.

Label convention of annotations: 0 = unlabelled, ``k + 1`` = class id ``k``.

Examples
--------
>>> spec = FeatureSpec(sigmas=(1.0, 3.5))
>>> spec.depth, spec.n_per_channel, spec.names(["sem"])[:3]
(14, 17, ['sem:raw', 'sem:gaussian-1', 'sem:log-1'])
>>> features_block(np.zeros((2, 32, 40), np.float32), spec).shape
(34, 32, 40)
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

__all__ = [
    "DEFAULT_SIGMAS",
    "KINDS",
    "Annotation",
    "FeatureSpec",
    "ShiftField",
    "aggregate_shifts",
    "chunk_grid",
    "estimate_shift",
    "features_block",
    "interpolate_field",
    "multiscale_features",
    "parse_annotations",
    "predict_block",
    "rasterise",
    "resample_block",
    "synthetic_scribbles",
]

log = logging.getLogger(__name__)

DEFAULT_SIGMAS: tuple[float, ...] = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)  # Ilastik's default set
#: feature kinds and the number of maps each gives per channel and sigma
KINDS: dict[str, int] = {"gaussian": 1, "log": 1, "gradient": 1, "dog": 1, "structure": 2,
                         "hessian": 2}


@dataclass(frozen=True)
class FeatureSpec:
    """Which features to compute for every channel: ``kinds`` at each of ``sigmas`` (px).

    ``raw`` adds the unfiltered intensity. DoG is ``G(sigma) - G(0.66 sigma)``; the
    structure tensor uses derivative and integration scales ``sigma / 2`` each (so its
    chain stays within ``4 sigma``); eigenvalues are sorted, largest first.

    >>> FeatureSpec(sigmas=(0.7, 10.0), kinds=("gaussian",)).depth
    40
    """

    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    kinds: tuple[str, ...] = tuple(KINDS)
    raw: bool = True

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or (not self.kinds and not self.raw):
            raise InputError("feature kinds", expected=f"some of {', '.join(KINDS)}",
                             got=repr(list(self.kinds)), fix="e.g. kinds=('gaussian', 'log')")
        if self.kinds and (not self.sigmas or min(self.sigmas) < 0.3 or max(self.sigmas) > 64):
            raise InputError("sigmas", expected="one or more scales in [0.3, 64] px",
                             got=repr(self.sigmas), fix=f"e.g. sigmas={DEFAULT_SIGMAS}")

    @property
    def depth(self) -> int:
        """Halo (px) a block needs: ``ceil(4 * max(sigmas))`` (0 for raw only)."""
        return _radius(max(self.sigmas)) if self.kinds else 0

    @property
    def n_per_channel(self) -> int:
        """Feature maps per input channel."""
        return int(self.raw) + len(self.sigmas) * sum(KINDS[k] for k in self.kinds)

    def names(self, channels: Sequence[str]) -> list[str]:
        """Feature names ``channel:kind-sigma`` in output order."""
        out = []
        for c in channels:
            out += [f"{c}:raw"] if self.raw else []
            for s in self.sigmas:
                for k in self.kinds:
                    out += ([f"{c}:{k}-{s:g}"] if KINDS[k] == 1 else
                            [f"{c}:{k}{i}-{s:g}" for i in (1, 2)])
        return out


def _radius(sigma: float) -> int:
    return math.ceil(4 * sigma - 1e-9)


def _eig2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (largest first) of the symmetric 2 x 2 matrices [[a, b], [b, c]]."""
    m, d = (a + c) / 2, np.hypot((a - c) / 2, b)
    return m + d, m - d


def features_block(block: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Features of a (c, h, w) or (h, w) block, float32 (c * n_per_channel, h, w).

    Channel-major, in the order of :meth:`FeatureSpec.names`. Borders use reflect mode;
    callers wanting chunk-independent results pad by ``spec.depth`` and crop.
    """
    x = np.asarray(block, np.float32)
    x = x[None] if x.ndim == 2 else x
    if x.ndim != 3:
        raise InputError("feature block", expected="a (c, h, w) or (h, w) array",
                         got=f"shape {x.shape}")
    out = np.empty((x.shape[0] * spec.n_per_channel, *x.shape[1:]), np.float32)
    i = 0
    for ch in x:
        if spec.raw:
            out[i] = ch
            i += 1
        for s in spec.sigmas:
            r = _radius(s)
            g = {"sigma": s, "radius": r, "mode": "reflect"}
            for k in spec.kinds:
                if k == "gaussian":
                    out[i] = ndi.gaussian_filter(ch, **g)
                elif k == "log":
                    out[i] = ndi.gaussian_laplace(ch, **g)
                elif k == "gradient":
                    out[i] = ndi.gaussian_gradient_magnitude(ch, **g)
                elif k == "dog":
                    out[i] = ndi.gaussian_filter(ch, **g)
                    out[i] -= ndi.gaussian_filter(ch, 0.66 * s, radius=r, mode="reflect")
                elif k == "structure":
                    ri = r // 2
                    gy = ndi.gaussian_filter(ch, s / 2, order=(1, 0), radius=ri, mode="reflect")
                    gx = ndi.gaussian_filter(ch, s / 2, order=(0, 1), radius=ri, mode="reflect")
                    so = {"sigma": s / 2, "radius": r - ri, "mode": "reflect"}
                    out[i], out[i + 1] = _eig2(ndi.gaussian_filter(gy * gy, **so),
                                               ndi.gaussian_filter(gy * gx, **so),
                                               ndi.gaussian_filter(gx * gx, **so))
                else:  # hessian
                    out[i], out[i + 1] = _eig2(ndi.gaussian_filter(ch, order=(2, 0), **g),
                                               ndi.gaussian_filter(ch, order=(1, 1), **g),
                                               ndi.gaussian_filter(ch, order=(0, 2), **g))
                i += KINDS[k]
    return out


def multiscale_features(image: np.ndarray, spec: FeatureSpec | None = None) -> np.ndarray:
    """In-memory reference: pad by ``spec.depth`` (symmetric), :func:`features_block`, crop.

    The chunked builder :func:`semdask.label.feature_stack` reproduces it for any chunking.
    """
    spec = spec or FeatureSpec()
    x = np.asarray(image, np.float32)
    x = x[None] if x.ndim == 2 else x
    d = spec.depth
    f = features_block(np.pad(x, ((0, 0), (d, d), (d, d)), mode="symmetric"), spec)
    return f[:, d:f.shape[1] - d, d:f.shape[2] - d]


# ----------------------------------------------------------------------------- registration
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


def chunk_grid(length: int, edge: int, minimum: int) -> tuple[int, ...]:
    """Chunks of ``edge``; a last sliver smaller than ``minimum`` joins its neighbour.

    >>> chunk_grid(1100, 512, 40), chunk_grid(1100, 512, 100)
    ((512, 512, 76), (512, 588))
    """
    n, rem = divmod(length, edge)
    sizes = [edge] * n
    if rem and sizes and rem < minimum:
        sizes[-1] += rem
    elif rem:
        sizes.append(rem)
    return tuple(sizes)


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


def predict_block(feats: np.ndarray, clf: Any, n_classes: int) -> np.ndarray:
    """Class probabilities (K, h, w) float32 of a feature block (F, h, w); a classifier
    without predict_proba gives one-hot rows. Columns follow ``clf.classes_``."""
    X = feats.reshape(feats.shape[0], -1).T
    out = np.zeros((n_classes, X.shape[0]), np.float32)
    cols = np.asarray(getattr(clf, "classes_", np.arange(n_classes)), np.int64)
    if hasattr(clf, "predict_proba"):
        out[cols] = np.asarray(clf.predict_proba(X), np.float32).T
    else:
        out[np.asarray(clf.predict(X), np.int64), np.arange(X.shape[0])] = 1
    return out.reshape(n_classes, *feats.shape[1:])



# ----------------------------------------------------------------------------- annotations
@dataclass(frozen=True)
class Annotation:
    """One annotated shape: ``kind`` point, line or polygon; ``coords`` (n, 2) as (y, x)
    pixel indices; ``cls`` the class id; points and lines are drawn ``radius`` px wide."""

    kind: str
    cls: int
    coords: np.ndarray
    radius: float = 2.0

    def bbox(self) -> tuple[float, float, float, float]:
        """(y_min, y_max, x_min, x_max) including the radius."""
        c, r = self.coords, 0.0 if self.kind == "polygon" else self.radius
        return (c[:, 0].min() - r, c[:, 0].max() + r, c[:, 1].min() - r, c[:, 1].max() + r)


def _class_id(value: Any, classes: Sequence[str], where: str) -> int:
    v = str(value).strip()
    if v in classes:
        return list(classes).index(v)
    low = [c.lower() for c in classes]
    if v.lower() in low:
        return low.index(v.lower())
    if v.isdigit() and int(v) < len(classes):
        return int(v)
    raise InputError(f"class {v!r} ({where})", expected=f"one of {', '.join(classes)} or a "
                     f"class id 0..{len(classes) - 1}", got=repr(v),
                     fix="fix the annotation, or pass the class names with --classes")


def parse_annotations(path: Any, classes: Sequence[str], *, radius: float = 2.0
                      ) -> list[Annotation]:
    """Shapes from a CSV (columns ``y, x, class`` and optional ``radius``: discs) or GeoJSON
    file (Point / LineString / Polygon features, ``[x, y]`` pixel coordinates, class in
    ``properties.class`` or QuPath's ``properties.classification.name``, optional
    ``properties.radius``). Classes are names or 0-based ids of ``classes``.
    """
    import csv
    import json
    from pathlib import Path

    p = Path(path)
    text = p.read_text(encoding="utf-8-sig")
    out: list[Annotation] = []
    if p.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        cols = {c.strip().lower(): c for c in (rows[0].keys() if rows else [])}
        if not {"y", "x", "class"} <= set(cols):
            raise InputError(f"{p}", expected="CSV columns y, x, class (optional radius)",
                             got=f"columns {list(cols)}", fix="add a header: y,x,class,radius")
        for i, r in enumerate(rows):
            rad = r.get(cols.get("radius", ""), "") or radius
            out.append(Annotation("point", _class_id(r[cols["class"]], classes, f"{p} row {i}"),
                                  np.array([[float(r[cols["y"]]), float(r[cols["x"]])]]),
                                  float(rad)))
        return out
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{p}", expected="GeoJSON", got=str(e)) from e
    feats = doc.get("features", [doc]) if isinstance(doc, dict) else doc
    kinds = {"Point": "point", "LineString": "line", "Polygon": "polygon"}
    for i, ft in enumerate(feats):
        geom, props = ft.get("geometry") or {}, ft.get("properties") or {}
        if geom.get("type") not in kinds:
            raise InputError(f"{p} feature {i}", expected="a Point, LineString or Polygon",
                             got=repr(geom.get("type")), fix="export points/lines/polygons")
        cls = props.get("class", (props.get("classification") or {}).get("name"))
        xy = np.asarray(geom["coordinates"][0] if geom["type"] == "Polygon"
                        else geom["coordinates"], np.float64).reshape(-1, 2)
        out.append(Annotation(kinds[geom["type"]], _class_id(cls, classes, f"{p} feature {i}"),
                              xy[:, ::-1].copy(), float(props.get("radius", radius))))
    return out


def rasterise(shapes: Sequence[Annotation], y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Label block uint8 (h, w) at global origin (y0, x0): ``cls + 1`` inside shapes, else 0.

    >>> a = Annotation("point", 2, np.array([[5.0, 5.0]]), radius=1.5)
    >>> int(rasterise([a], 0, 0, 10, 10).sum() // 3)
    9
    """
    from skimage.draw import disk, polygon

    out = np.zeros((h, w), np.uint8)
    for a in shapes:
        ya, yb, xa, xb = a.bbox()
        if yb < y0 - 1 or ya > y0 + h or xb < x0 - 1 or xa > x0 + w:
            continue
        c = a.coords - (y0, x0)
        if a.kind == "polygon":
            out[polygon(c[:, 0], c[:, 1], shape=(h, w))] = a.cls + 1
            continue
        pts = c
        if a.kind == "line" and len(c) > 1:  # sample the segments every 0.5 px
            seg = [np.linspace(p, q, max(2, int(np.hypot(*(q - p)) * 2) + 1))
                   for p, q in itertools.pairwise(c)]
            pts = np.concatenate(seg)
        for p in pts:
            out[disk((p[0], p[1]), max(a.radius, 0.5), shape=(h, w))] = a.cls + 1
    return out


def synthetic_scribbles(truth: Any, n_per_class: int, *, seed: int = 0, radius: int = 2,
                        length: tuple[int, int] = (6, 24),
                        n_classes: int | None = None) -> np.ndarray:
    """Sparse scribbles from a truth map: ``n_per_class`` short strokes inside each class.

    Strokes start at random pixels at least ``radius + 2`` px inside their class, run in a
    random direction for ``length`` px (stopping before a boundary) and are ``2 radius + 1``
    px wide. Returns uint8 (h, w): 0 = unlabelled, ``k + 1`` = class ``k``.

    >>> t = np.zeros((40, 40), np.uint8); t[:, 20:] = 1
    >>> s = synthetic_scribbles(t, 3, seed=1)
    >>> sorted(np.unique(s).tolist()), bool((s[t == 0] != 2).all() and (s[t == 1] != 1).all())
    ([0, 1, 2], True)
    """
    truth = np.asarray(truth)
    if truth.ndim != 2:
        raise InputError("truth", expected="a 2-D (y, x) label map", got=f"shape {truth.shape}")
    rng = np.random.default_rng(seed)
    out = np.zeros(truth.shape, np.uint8)
    t = np.arange(0, length[1] + 0.5, 0.5)
    for k in range(int(n_classes or truth.max() + 1)):
        ok = ndi.distance_transform_edt(np.pad(truth == k, 1))[1:-1, 1:-1] > radius + 1.5
        cand = np.flatnonzero(ok)
        if not cand.size:
            log.warning("synthetic_scribbles: class %d has no pixel %d px from a boundary",
                        k, radius + 2)
            continue
        start = rng.choice(cand, n_per_class, replace=cand.size < n_per_class)
        n = (n_per_class, 1)
        ang = rng.uniform(0, 2 * np.pi, n) + rng.normal(0, 0.04, n) * t  # gently curved
        ys = np.rint(start[:, None] // truth.shape[1] + np.sin(ang) * t).astype(np.intp)
        xs = np.rint(start[:, None] % truth.shape[1] + np.cos(ang) * t).astype(np.intp)
        inb = (ys >= 0) & (ys < truth.shape[0]) & (xs >= 0) & (xs < truth.shape[1])
        keep = inb & (t <= rng.integers(length[0], length[1] + 1, n_per_class)[:, None])
        keep[inb] &= ok[ys[inb], xs[inb]]
        keep = np.cumprod(keep, axis=1).astype(bool)  # stop at the first step outside
        centres = np.zeros(truth.shape, bool)
        centres[ys[keep], xs[keep]] = True
        if radius > 0:
            centres = ndi.binary_dilation(centres, _disk(radius))
        out[centres] = k + 1
    return out


def _disk(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return np.asarray(yy * yy + xx * xx <= r * r + r)
