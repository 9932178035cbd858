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
  ``connectivity=2`` for 8), the scipy.ndimage convention.

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
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import InputError

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

#: bit flags of the mosaic borders a component touches
TOP, BOTTOM, LEFT, RIGHT = 1, 2, 4, 8
#: the triple of the triple-phase boundary (class names, case-insensitive)
TPB_PHASES = ("Ni", "YSZ", "pore")


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8), got {connectivity}")
    return ndi.generate_binary_structure(2, connectivity)


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


def label_block(block: np.ndarray, n_classes: int, *,
                connectivity: int = 1) -> tuple[np.ndarray, int]:
    """Label the connected components of every class of one block (0 = unlabelled pixels).

    Returns int64 labels ``1..n`` (the components of class 0 first, then class 1, ...) and ``n``.
    """
    st = _structure(connectivity)
    out = np.zeros(block.shape, np.int64)
    n = 0
    for c in range(n_classes):
        mask = block == c
        if not mask.any():
            continue
        lab, k = ndi.label(mask, structure=st)
        out[mask] = lab[mask] + n
        n += int(k)
    return out, n


@dataclass(frozen=True)
class ComponentTable:
    """Connected components: id, class, area (px) and the mosaic borders each touches.

    ``flags`` is a bit set of :data:`TOP`, :data:`BOTTOM`, :data:`LEFT`, :data:`RIGHT`.
    """

    ids: np.ndarray
    phase: np.ndarray
    area: np.ndarray
    flags: np.ndarray

    @staticmethod
    def concat(tables: Sequence[ComponentTable]) -> ComponentTable:
        """Stack several tables (e.g. the tables of all blocks)."""
        if not tables:
            return ComponentTable(*(np.zeros(0, np.int64) for _ in range(4)))
        return ComponentTable(*(np.concatenate([getattr(t, f) for t in tables])
                                for f in ("ids", "phase", "area", "flags")))


def component_table(block: np.ndarray, lab: np.ndarray, n: int, *, base: int = 0,
                    borders: int = 0) -> ComponentTable:
    """Table of the components of ``lab`` (from :func:`label_block`); ids are ``base + label``.

    ``borders`` says which sides of this block are mosaic borders (bit flags).
    """
    area = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.int64)
    phase = np.zeros(n + 1, np.int64)
    phase[lab.ravel()] = block.ravel()
    flags = np.zeros(n + 1, np.int64)
    for bit, edge in ((TOP, lab[0]), (BOTTOM, lab[-1]), (LEFT, lab[:, 0]), (RIGHT, lab[:, -1])):
        if borders & bit:
            flags[np.unique(edge)] |= bit
    ids = np.arange(1, n + 1, dtype=np.int64) + base
    return ComponentTable(ids, phase[1:], area, flags[1:])


def face_pairs(a_ids: np.ndarray, b_ids: np.ndarray, a_cls: np.ndarray, b_cls: np.ndarray, *,
               connectivity: int = 1) -> np.ndarray:
    """Pairs of component ids that touch across a chunk face (shape ``(k, 2)``).

    ``a_*`` and ``b_*`` are the pixel lines on either side of the face (same length, aligned);
    with ``connectivity=2`` diagonal neighbours along the face count too.
    """
    shifts = [(slice(None), slice(None))]
    if connectivity == 2:
        shifts += [(slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))]
    out = []
    for sa, sb in shifts:
        la, lb, ca, cb = a_ids[sa], b_ids[sb], a_cls[sa], b_cls[sb]
        keep = (la > 0) & (lb > 0) & (ca == cb)
        out.append(np.stack([la[keep], lb[keep]], axis=1))
    return np.unique(np.concatenate(out), axis=0) if out else np.zeros((0, 2), np.int64)


def merge_components(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over id pairs: sorted ``keys`` and each key's root (smallest id of its set).

    >>> keys, roots = merge_components(np.array([[5, 9], [9, 2], [7, 8]]))
    >>> keys.tolist(), roots.tolist()
    ([2, 5, 7, 8, 9], [2, 2, 7, 7, 2])
    """
    if len(pairs) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    keys, inv = np.unique(np.asarray(pairs, np.int64), return_inverse=True)
    inv = inv.reshape(-1, 2)
    k = len(keys)
    graph = coo_matrix((np.ones(len(inv), np.int8), (inv[:, 0], inv[:, 1])), shape=(k, k))
    _, comp = connected_components(graph, directed=False)
    root = np.full(comp.max() + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(root, comp, keys)
    return keys, root[comp]


def relabel(ids: np.ndarray, keys: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """Map ``ids`` through ``keys -> roots`` (ids not in ``keys`` stay as they are).

    >>> relabel(np.array([0, 5, 6, 9]), np.array([5, 9]), np.array([5, 5])).tolist()
    [0, 5, 6, 5]
    """
    out = np.array(ids, np.int64, copy=True)
    if len(keys) == 0:
        return out
    idx = np.clip(np.searchsorted(keys, out), 0, len(keys) - 1)
    hit = keys[idx] == out
    out[hit] = roots[idx[hit]]
    return out


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


def connectivity_stats(t: ComponentTable, n_classes: int) -> dict[str, np.ndarray]:
    """Per class: area shares in percolating (x, y, either), largest and isolated components.

    A component percolates in x when it touches the left and the right mosaic border (y: top
    and bottom); *isolated* components touch no border (they lie wholly inside the section);
    the rest (``dead_end``) touch a border without crossing: their fate outside is unknown.

    >>> t = ComponentTable(np.arange(3), np.array([0, 0, 1]), np.array([6, 2, 4]),
    ...                    np.array([LEFT | RIGHT, 0, TOP]))
    >>> s = connectivity_stats(t, 2)
    >>> s["percolating_x"].tolist(), s["isolated"].tolist(), s["dead_end"].tolist()
    ([0.75, 0.0], [0.25, 0.0], [0.0, 1.0])
    """
    def share(mask: np.ndarray) -> np.ndarray:
        a = np.bincount(t.phase[mask], weights=t.area[mask], minlength=n_classes)
        return np.divide(a, area, out=np.full(n_classes, np.nan), where=area > 0)

    area = np.bincount(t.phase, weights=t.area, minlength=n_classes)
    fx = (t.flags & (LEFT | RIGHT)) == (LEFT | RIGHT)
    fy = (t.flags & (TOP | BOTTOM)) == (TOP | BOTTOM)
    largest = np.zeros(n_classes)
    np.maximum.at(largest, t.phase, t.area)
    out = {"components": np.bincount(t.phase, minlength=n_classes), "area_px": area,
           "percolating_x": share(fx), "percolating_y": share(fy),
           "percolating": share(fx | fy), "isolated": share(t.flags == 0),
           "dead_end": share((t.flags != 0) & ~fx & ~fy),
           "largest": np.divide(largest, area, out=np.full(n_classes, np.nan), where=area > 0)}
    return out


def size_stats(t: ComponentTable, n_classes: int, *, pixel_size: float = 1.0,
               min_area_px: int = 1, bins: int = 30) -> dict[str, np.ndarray]:
    """Equivalent circular diameters ``2 sqrt(A / pi)`` of the components of each class.

    Components touching a mosaic border (truncated) and those smaller than ``min_area_px``
    are counted but left out of the statistics. Returns per-class number-weighted ``mean``,
    ``d10``, ``d50``, ``d90``, the area-weighted ``d50_area`` and counts, plus a histogram
    ``hist`` ``(n_classes, bins)`` over shared log-spaced ``edges``.

    >>> t = ComponentTable(np.arange(3), np.zeros(3, int), np.array([314, 314, 50]),
    ...                    np.array([0, 0, TOP]))
    >>> s = size_stats(t, 1, pixel_size=0.5)
    >>> s["d50"].round(2).tolist(), s["n"].tolist(), s["n_border"].tolist()
    ([10.0], [2], [1])
    """
    inner = (t.flags == 0) & (t.area >= min_area_px)
    d = 2.0 * np.sqrt(t.area / np.pi) * pixel_size
    keys = ("n", "n_border", "n_small", "mean", "d10", "d50", "d90", "d50_area")
    out = {k: np.full(n_classes, np.nan) for k in keys}
    lo = d[inner].min() if inner.any() else pixel_size
    hi = d[inner].max() if inner.any() else 10 * pixel_size
    edges = np.geomspace(lo, max(hi, lo * 1.0001), bins + 1)
    hist = np.zeros((n_classes, bins), np.int64)
    for c in range(n_classes):
        sel = inner & (t.phase == c)
        out["n"][c], out["n_border"][c] = sel.sum(), ((t.phase == c) & (t.flags != 0)).sum()
        out["n_small"][c] = ((t.phase == c) & (t.flags == 0) & (t.area < min_area_px)).sum()
        if sel.any():
            dc = np.sort(d[sel])
            out["mean"][c] = dc.mean()
            out["d10"][c], out["d50"][c], out["d90"][c] = np.percentile(dc, [10, 50, 90])
            w = np.cumsum(dc**2) / np.sum(dc**2)
            out["d50_area"][c] = dc[np.searchsorted(w, 0.5)]
            hist[c] = np.histogram(dc, edges)[0]
    for k in ("n", "n_border", "n_small"):
        out[k] = out[k].astype(np.int64)
    return {**out, "hist": hist, "edges": edges}


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
