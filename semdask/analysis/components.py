"""Connected components of label blocks: labelling, union-find merge, connectivity, sizes.

Pure numpy/scipy kernels (no Dask, no files): :func:`label_block` labels the components of
every class of one block (4-connectivity by default, ``connectivity=2`` for 8, the
scipy.ndimage convention); :func:`component_table` lists them with their area and the
mosaic borders they touch; :func:`face_pairs` and :func:`merge_components` (union-find)
join components across chunk faces and :func:`relabel` applies the merge.
:func:`connectivity_stats` (percolation) and :func:`size_stats` (equivalent diameters)
summarise a merged :class:`ComponentTable`. :mod:`semdask.analysis` maps these over chunks;
:mod:`semdask.analysis.morphology` re-exports every name.

Examples
--------
>>> x = np.array([[0, 0, 1, 1],
...               [0, 0, 1, 1],
...               [3, 3, 3, 3]], np.uint8)
>>> lab, n = label_block(x, 4)
>>> n, lab.tolist()
(3, [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "BOTTOM",
    "LEFT",
    "RIGHT",
    "TOP",
    "ComponentTable",
    "component_table",
    "connectivity_stats",
    "face_pairs",
    "label_block",
    "merge_components",
    "relabel",
    "size_stats",
]

#: bit flags of the mosaic borders a component touches
TOP, BOTTOM, LEFT, RIGHT = 1, 2, 4, 8


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8), got {connectivity}")
    return ndi.generate_binary_structure(2, connectivity)


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


# ------------------------------------------------------------- statistics


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
