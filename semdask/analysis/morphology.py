"""Pure numpy kernels of the microstructure analysis: counts and components of one block.

Nothing here knows about Dask or files; :mod:`semdask.analysis` maps these kernels over the
chunks of a mosaic and pools their integer outputs, so every figure is chunk-invariant.

Estimators
----------
- **Interfaces**: a phase pair ``(i, j)`` contributes one unit edge for every pair of
  4-neighbours (horizontal or vertical) with classes ``i`` and ``j``. Edge counts measure a
  boundary in the city-block metric, which overestimates the length of an isotropic
  (randomly oriented) boundary by ``4 / pi`` on average (Cauchy-Crofton with the two axis
  directions), so the length estimate is ``L = pi / 4 * n_edges * pixel_size``: exact on
  average for isotropic microstructures (a digitised circle of radius ``r`` has ``8 r``
  edges, ``pi / 4 * 8 r = 2 pi r``), ``pi / 4`` too short for an axis-aligned straight
  boundary and ``pi / (2 sqrt 2) = 1.11`` too long at 45 degrees.
- **Triple-phase boundary (TPB)**: a TPB point is a pixel corner whose 2 x 2 neighbourhood
  holds all three phases of the triple (the fourth pixel can be anything, and two of them may
  meet only diagonally). Each 2 x 2 window is counted once, at its top-left pixel. The 2-D
  density ``P_A`` (points per um^2) estimates the 3-D TPB length density of an isotropic
  structure as ``L_V = 2 P_A`` (um/um^3; stereology), reported beside it.
- **Fractions**: pooled pixel counts; spread and 95 % confidence intervals from the
  tile-to-tile variance (ratio estimator, t interval; see :func:`fraction_stats`).
- **Components**: connected components of each class separately (4-connectivity by default,
  ``connectivity=2`` for 8), the scipy.ndimage convention; the component kernels
  (labelling, union-find merge, connectivity and size statistics) live in
  :mod:`semdask.analysis.components` and are re-exported here.

Examples
--------
>>> x = np.array([[0, 0, 1, 1],
...               [0, 0, 1, 1],
...               [3, 3, 3, 3]], np.uint8)
>>> c = boundary_counts(x, 4, triple=(1, 3, 0), core=(3, 4))
>>> int(c.edges[0, 1] + c.edges[1, 0]), int(c.edges[0, 3] + c.edges[3, 0]), c.tpb
(2, 2, 1)
>>> lab, n = label_block(x, 4)
>>> n, lab.tolist()
(3, [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from semdask.analysis.components import (
    BOTTOM,
    LEFT,
    RIGHT,
    TOP,
    ComponentTable,
    component_table,
    connectivity_stats,
    face_pairs,
    label_block,
    merge_components,
    relabel,
    size_stats,
)
from semdask.errors import InputError

__all__ = [
    "BOTTOM",
    "LEFT",
    "RIGHT",
    "TOP",
    "TPB_PHASES",
    "BoundaryCounts",
    "ComponentTable",
    "Region",
    "boundary_counts",
    "component_table",
    "connectivity_stats",
    "face_pairs",
    "fraction_stats",
    "label_block",
    "merge_components",
    "parse_roi",
    "parse_series_item",
    "relabel",
    "size_stats",
    "tables",
    "tile_counts",
    "tpb_triple",
]

#: the triple of the triple-phase boundary (class names, case-insensitive)
TPB_PHASES = ("Ni", "YSZ", "pore")


def tile_counts(block: np.ndarray, n_classes: int, *, y0: int, x0: int, tile: int,
                grid: tuple[int, int]) -> np.ndarray:
    """Pixels per (tile row, tile column, class) of a block at global offset ``(y0, x0)``.

    Tiles are ``tile`` x ``tile`` squares on a grid anchored at the global origin; values
    ``>= n_classes`` (unlabelled) are not counted.

    >>> b = np.array([[0, 1, 1], [1, 1, 9]], np.uint8)
    >>> tile_counts(b, 2, y0=0, x0=1, tile=2, grid=(1, 2))[0].tolist()
    [[1, 1], [0, 3]]
    """
    h, w = block.shape
    ty = (y0 + np.arange(h)) // tile
    tx = (x0 + np.arange(w)) // tile
    idx = (ty[:, None] * grid[1] + tx[None, :]).ravel()
    v = block.ravel().astype(np.intp)
    keep = v < n_classes
    out = np.bincount(idx[keep] * n_classes + v[keep], minlength=grid[0] * grid[1] * n_classes)
    return out.reshape(grid[0], grid[1], n_classes).astype(np.int64)


@dataclass(frozen=True)
class BoundaryCounts:
    """Ordered 4-neighbour pair counts ``edges[a, b]`` and the number of TPB corners."""

    edges: np.ndarray
    tpb: int


def boundary_counts(x: np.ndarray, n_classes: int, *, triple: Sequence[int] | None,
                    core: tuple[int, int]) -> BoundaryCounts:
    """Count interfaces and TPB corners owned by the ``core`` part of ``x``.

    ``x`` is a core block of shape ``core = (h, w)``, optionally extended by one row below
    and one column to the right (pad with a value ``>= n_classes`` at the mosaic edge).
    A horizontal/vertical pair is owned by its left/top pixel, a 2 x 2 window by its
    top-left pixel, so adjacent blocks never count the same pair or corner twice.
    """
    h, w = core
    n = int(n_classes)
    edges = np.zeros(n * n, np.int64)
    right, down = x[:h, 1:w + 1], x[1:h + 1, :w]
    for a, b in ((x[:h, :right.shape[1]], right), (x[:down.shape[0], :w], down)):
        a, b = a.astype(np.intp), b.astype(np.intp)
        keep = (a < n) & (b < n) & (a != b)
        edges += np.bincount(a[keep] * n + b[keep], minlength=n * n)
    tpb = 0
    if triple is not None and x.shape[0] > 1 and x.shape[1] > 1:
        hh, ww = min(h, x.shape[0] - 1), min(w, x.shape[1] - 1)
        win = [x[dy:dy + hh, dx:dx + ww] for dy in (0, 1) for dx in (0, 1)]
        has = np.ones((hh, ww), bool)
        for c in triple:
            has &= (win[0] == c) | (win[1] == c) | (win[2] == c) | (win[3] == c)
        tpb = int(has.sum())
    return BoundaryCounts(edges.reshape(n, n), tpb)


# ------------------------------------------------------------- statistics from pooled counts


def fraction_stats(tiles: np.ndarray, *, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """Pooled fractions, tile-to-tile spread and confidence intervals from per-tile counts.

    ``tiles`` is ``(..., n_classes)`` pixel counts per tile. The fraction is the pooled ratio
    ``R = sum(y_i) / sum(m_i)`` (``y_i`` class pixels, ``m_i`` labelled pixels of tile ``i``);
    tiles are treated as clusters of a cluster sample (ratio estimator): the spread is
    ``s^2 = sum((y_i - R m_i)^2) / ((n - 1) mean(m)^2)`` (for equal tiles, the variance of
    the tile fractions), the standard error ``s / sqrt(n)`` and the interval
    ``R +- t_{(1+confidence)/2, n-1} * s / sqrt(n)``, clipped to [0, 1]. Empty tiles are left
    out; with fewer than two tiles spread and interval are NaN. Neighbouring tiles are
    correlated when tiles are not much larger than the microstructure, which makes the
    interval too narrow: keep tiles >> the particle size.

    >>> t = np.array([[[8, 2], [6, 4]], [[7, 3], [7, 3]]])
    >>> r = fraction_stats(t)
    >>> r["fraction"].round(3).tolist(), r["std"].round(4).tolist(), int(r["n_tiles"])
    ([0.7, 0.3], [0.0816, 0.0816], 4)
    """
    from scipy import stats

    y = np.asarray(tiles, np.float64).reshape(-1, np.shape(tiles)[-1])
    m = y.sum(1)
    y, m = y[m > 0], m[m > 0]
    n, total = len(m), m.sum()
    frac = y.sum(0) / total if total else np.full(y.shape[1], np.nan)
    if n >= 2:
        std = np.sqrt(((y - frac[None] * m[:, None]) ** 2).sum(0) / ((n - 1) * m.mean() ** 2))
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / np.sqrt(n)
    else:
        std = half = np.full(y.shape[1], np.nan)
    return {"pixels": y.sum(0).astype(np.int64), "fraction": frac, "std": std,
            "ci_low": np.clip(frac - half, 0, 1), "ci_high": np.clip(frac + half, 0, 1),
            "n_tiles": np.asarray(n)}


# ------------------------------------------------------------- parsing and tables


@dataclass(frozen=True)
class Region:
    """A rectangle ``[y0:y1, x0:x1]`` of the mosaic in pixels (end exclusive)."""

    name: str
    y0: int
    y1: int
    x0: int
    x1: int


def parse_roi(text: str, shape: Sequence[int]) -> Region:
    """Parse ``"y0:y1,x0:x1"`` (pixels) and check it lies inside an image of ``shape``.

    >>> parse_roi("0:10,5:20", (100, 100))
    Region(name='0:10,5:20', y0=0, y1=10, x0=5, x1=20)
    """
    try:
        ys, xs = text.split(",")
        (y0, y1), (x0, x1) = ([int(v) for v in s.split(":")] for s in (ys, xs))
    except ValueError:
        raise InputError(f"ROI {text!r}", expected="y0:y1,x0:x1 in pixels", got=repr(text),
                         fix="e.g. --roi 0:1024,0:2048") from None
    H, W = (int(s) for s in shape)
    if not (0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W):
        raise InputError(f"ROI {text!r}", expected=f"0 <= y0 < y1 <= {H}, 0 <= x0 < x1 <= {W}",
                         got="a region outside the image",
                         fix=f"the labels are {H} x {W} px; pick a region inside them")
    return Region(text, y0, y1, x0, x1)


def parse_series_item(text: str) -> tuple[str, float]:
    """``"PATH:TIME"`` -> ``(PATH, TIME)``.

    >>> parse_series_item("runs/a.ome.zarr:2.5")
    ('runs/a.ome.zarr', 2.5)
    """
    path, sep, t = str(text).rpartition(":")
    try:
        if not sep or not path:
            raise ValueError
        return path, float(t)
    except ValueError:
        raise InputError(f"series item {text!r}", expected="MOSAIC:TIME, e.g. a.ome.zarr:5",
                         got=repr(text)) from None


def tpb_triple(classes: Sequence[str]) -> tuple[int, int, int] | None:
    """Class ids of Ni, YSZ and pore (case-insensitive), or None when one is missing.

    >>> tpb_triple(["pore", "Ni", "NiO", "YSZ"]), tpb_triple(["a", "b"])
    ((1, 3, 0), None)
    """
    low = [c.lower() for c in classes]
    if not all(p.lower() in low for p in TPB_PHASES):
        return None
    a, b, c = (low.index(p.lower()) for p in TPB_PHASES)
    return a, b, c


def _f(v: Any) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def tables(classes: Sequence[str], *, tiles: np.ndarray, boundary: np.ndarray,
           components: ComponentTable | None = None, truth_counts: np.ndarray | None = None,
           pixel_size_um: float | None = None, min_area_px: int = 9, region: str = "mosaic",
           triple: Sequence[int] | None = None) -> dict[str, Any]:
    """Result tables (lists of row dicts) from pooled counts and a merged component table.

    ``tiles``: per-tile class counts; ``boundary``: ``[ordered pair counts (n * n), tpb]``.
    Lengths are in um (px without ``pixel_size_um``; the column names say which). Keys:
    ``fractions``, ``interfaces``, ``tpb`` and, with ``components``, ``connectivity``,
    ``sizes``, ``histogram``.
    """
    n, names = len(classes), [str(c) for c in classes]
    px = 1.0 if pixel_size_um is None else float(pixel_size_um)
    u = "px" if pixel_size_um is None else "um"
    fs = fraction_stats(tiles)
    total = float(fs["pixels"].sum())
    if total == 0:
        raise InputError(f"labels ({region})", expected="at least one labelled pixel", got="none")
    area = total * px * px
    fractions = []
    for c in range(n):
        row = {"region": region, "phase": names[c], "pixels": int(fs["pixels"][c]),
               "fraction": _f(fs["fraction"][c]), "tile_std": _f(fs["std"][c]),
               "ci_low": _f(fs["ci_low"][c]), "ci_high": _f(fs["ci_high"][c]),
               "n_tiles": int(fs["n_tiles"]), f"area_{u}2": float(fs["pixels"][c] * px * px)}
        if truth_counts is not None:
            tf = truth_counts[c] / max(int(truth_counts.sum()), 1)
            row |= {"truth_fraction": float(tf),
                    "error_pp": float(100 * (fs["fraction"][c] - tf))}
        fractions.append(row)
    edges = boundary[:-1].reshape(n, n)
    interfaces = [{"region": region, "phase_a": names[a], "phase_b": names[b],
                   "edges": int(edges[a, b] + edges[b, a]),
                   f"length_{u}": math.pi / 4 * int(edges[a, b] + edges[b, a]) * px,
                   f"L_A_per_{u}": math.pi / 4 * int(edges[a, b] + edges[b, a]) * px / area}
                  for a in range(n) for b in range(a + 1, n)]
    tpb: dict[str, Any] = {"region": region, "phases": "/".join(TPB_PHASES) if triple else None,
                           "points": int(boundary[-1]) if triple else None,
                           f"P_A_per_{u}2": float(boundary[-1] / area) if triple else None,
                           f"L_V_per_{u}2": float(2 * boundary[-1] / area) if triple else None}
    out: dict[str, Any] = {"fractions": fractions, "interfaces": interfaces, "tpb": tpb}
    if components is None:
        return out
    cs = connectivity_stats(components, n)
    ss = size_stats(components, n, pixel_size=px, min_area_px=min_area_px)
    keys = ("percolating_x", "percolating_y", "percolating", "largest", "isolated", "dead_end")
    out["connectivity"] = [{"region": region, "phase": names[c],
                            "components": int(cs["components"][c]),
                            f"area_{u}2": float(cs["area_px"][c]) * px * px,
                            **{k: _f(cs[k][c]) for k in keys}} for c in range(n)]
    out["sizes"] = [{"region": region, "phase": names[c], "n": int(ss["n"][c]),
                     "n_border": int(ss["n_border"][c]), "n_small": int(ss["n_small"][c]),
                     **{f"{k}_{u}": _f(ss[k][c]) for k in ("mean", "d10", "d50", "d90",
                                                           "d50_area")}} for c in range(n)]
    e = ss["edges"]
    out["histogram"] = [{"region": region, "phase": names[c], f"bin_lo_{u}": float(e[k]),
                         f"bin_hi_{u}": float(e[k + 1]), "count": int(ss["hist"][c, k])}
                        for c in range(n) for k in range(len(e) - 1)]
    return out
