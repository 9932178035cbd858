"""Annotations for the EDS-guided labelling: parse, rasterise, read lazily, or synthesise.

* :func:`parse_annotations` (CSV / GeoJSON) and :func:`rasterise` -- points, strokes and
  polygons (:class:`Annotation`) to a label block;
* :func:`read_annotations` -- shapes, label images or ``labels/<name>`` of the mosaic store
  as a lazy uint8 (y, x) dask array chunked like the features;
* :func:`synthetic_scribbles` -- sparse scribbles drawn inside the classes of a truth map.

Label convention: 0 = unlabelled, ``k + 1`` = class id ``k`` (Ilastik's).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from scipy import ndimage as ndi

from semdask.errors import InputError
from semdask.storage import io

__all__ = [
    "Annotation",
    "parse_annotations",
    "rasterise",
    "read_annotations",
    "synthetic_scribbles",
]

log = logging.getLogger(__name__)


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


def read_annotations(source: Any, shape: tuple[int, int], chunks: Any, *,
                     classes: Sequence[str], mosaic: Any = None, unlabelled: int = 0,
                     radius: float = 2.0) -> da.Array:
    """Annotations as uint8 (y, x), 0 = unlabelled, ``k + 1`` = class ``k``, lazily.

    ``source``: shapes (:class:`~semdask.labelling.annotations.Annotation`), a label array, a CSV or
    GeoJSON file, a TIFF/PNG label image, or ``labels/<name>`` in the mosaic store.
    Label images follow ``unlabelled`` (0: values are class id + 1; 255: class ids).
    """
    if isinstance(source, str | Path) and not Path(source).is_file():
        name = str(source).removeprefix("labels/")
        source = io.open_labels(mosaic, name).data
    elif isinstance(source, str | Path) and Path(source).suffix.lower() in (
            ".csv", ".geojson", ".json"):
        source = parse_annotations(source, classes, radius=radius)
    elif isinstance(source, str | Path):
        from semdask.ingest.readers import open_image

        img = open_image(source)
        source = img.read(0, img.shape[0], 0, img.shape[1])
    if isinstance(source, Sequence) and all(isinstance(a, Annotation) for a in source):
        if not source:
            raise InputError("annotations", expected="at least one shape", got="none",
                             fix="add points, strokes or polygons with a class")
        shapes = list(source)
        offs = [np.cumsum((0, *c)) for c in chunks]

        def draw(block: np.ndarray, block_id: tuple[int, ...] | None = None) -> np.ndarray:
            assert block_id is not None
            iy, ix = block_id
            return rasterise(shapes, offs[0][iy], offs[1][ix], *block.shape)

        return da.map_blocks(draw, da.zeros(shape, np.uint8, chunks=chunks), dtype=np.uint8,
                             meta=np.empty((0, 0), np.uint8))
    arr = source if isinstance(source, da.Array) else da.from_array(np.asarray(source))
    if tuple(arr.shape) != tuple(shape):
        raise InputError("annotations", expected=f"a label image of the mosaic's shape {shape}",
                         got=f"shape {arr.shape}", fix="draw the scribbles on the same image")
    arr = arr.rechunk(chunks)
    if unlabelled == 255:
        arr = da.where(arr == 255, 0, arr.astype(np.int16) + 1)
    elif unlabelled != 0:
        raise InputError("unlabelled", expected="0 or 255", got=repr(unlabelled))
    return arr.astype(np.uint8)
