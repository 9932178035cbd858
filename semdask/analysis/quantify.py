"""Quantify segmented mosaics: fractions with confidence intervals, connectivity, particle
sizes, interfaces and triple-phase boundaries, in physical units; oxidation time series.

Every figure comes from integer counts pooled over chunks (tile class counts, 4-neighbour
pair counts and 2 x 2 corner counts with a 1-px halo) or from connected components labelled
per chunk and merged across chunk faces by union-find, so results do not depend on the
chunking. The estimators are documented in :mod:`semdask.analysis.morphology`; the writers of
tables and plots (:func:`write_analysis`, :func:`write_series`) live in
:mod:`semdask.analysis.report` and are re-exported here.

Examples
--------
>>> import numpy as np, dask.array as da
>>> lab = np.zeros((40, 60), np.uint8); lab[:, 20:40] = 1; lab[10:30, 30:50] = 3
>>> a = analyze_labels(da.from_array(lab, chunks=16), classes=["pore", "Ni", "NiO", "YSZ"],
...                    pixel_size_um=0.5, tile=20, min_area_px=1)
>>> [round(r["fraction"], 3) for r in a.fractions]
[0.583, 0.25, 0.0, 0.167]
>>> a.tpb["points"], a.connectivity[1]["percolating_y"], a.sizes[3]["n"]
(2, 1.0, 1)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from semdask.analysis import morphology as mo
from semdask.analysis.metrics import class_counts
from semdask.analysis.report import write_analysis, write_series
from semdask.errors import InputError, SemdaskError

__all__ = [
    "Analysis",
    "Series",
    "analyze",
    "analyze_labels",
    "analyze_series",
    "boundary_count_graph",
    "component_graph",
    "label_components",
    "merge_component_blocks",
    "tile_count_graph",
    "write_analysis",
    "write_series",
]

log = logging.getLogger(__name__)
PAD = 255  #: halo value at the mosaic edge (never a class)
PathLike = str | Path


# ---------------------------------------------------------------- graph builders


def tile_count_graph(labels: da.Array, n_classes: int, tile: int) -> da.Array:
    """Pixels per (tile row, tile column, class) on a ``tile`` grid anchored at the origin."""
    x = da.asarray(labels)
    grid = (-(-x.shape[0] // tile), -(-x.shape[1] // tile))

    def f(b: np.ndarray, block_info: Any = None) -> np.ndarray:
        (y0, _), (x0, _) = block_info[0]["array-location"]
        return mo.tile_counts(b, n_classes, y0=y0, x0=x0, tile=tile, grid=grid)[None, None]

    parts = da.map_blocks(f, x, dtype=np.int64, new_axis=[2, 3, 4],
                          chunks=((1,) * x.numblocks[0], (1,) * x.numblocks[1], (grid[0],),
                                  (grid[1],), (n_classes,)),
                          meta=np.empty((0,) * 5, np.int64))
    return parts.sum(axis=(0, 1))


def boundary_count_graph(labels: da.Array, n_classes: int,
                         triple: Sequence[int] | None) -> da.Array:
    """Pooled ``[edges (n * n, ordered pairs)..., tpb]`` counts via a 1-px halo (see morphology)."""
    x = da.asarray(labels)
    n = int(n_classes)
    g = da.overlap.overlap(x, depth={0: 1, 1: 1}, boundary={0: PAD, 1: PAD})

    def f(b: np.ndarray) -> np.ndarray:
        c = mo.boundary_counts(b[1:, 1:], n, triple=triple, core=(b.shape[0] - 2,
                                                                   b.shape[1] - 2))
        return np.append(c.edges.ravel(), c.tpb).reshape(1, 1, -1)

    parts = g.map_blocks(f, dtype=np.int64, new_axis=2,
                         chunks=((1,) * x.numblocks[0], (1,) * x.numblocks[1], (n * n + 1,)),
                         meta=np.empty((0, 0, 0), np.int64))
    return parts.sum(axis=(0, 1))


def _stride(x: da.Array) -> int:
    return max(x.chunks[0]) * max(x.chunks[1]) + 1


def _block_components(b: np.ndarray, base: int, borders: int, n: int,
                      conn: int) -> tuple[mo.ComponentTable, dict[str, tuple[Any, Any]]]:
    lab, k = mo.label_block(b, n, connectivity=conn)
    t = mo.component_table(b, lab, k, base=base, borders=borders)
    g = np.where(lab > 0, lab + base, 0)
    return t, {"top": (g[0], b[0]), "bottom": (g[-1], b[-1]),
               "left": (g[:, 0], b[:, 0]), "right": (g[:, -1], b[:, -1])}


def component_graph(labels: da.Array, n_classes: int, connectivity: int = 1) -> list[list[Any]]:
    """Delayed per-block component tables and edge lines (merge with merge_component_blocks)."""
    x = da.asarray(labels)
    ny, nx = x.numblocks
    blocks, s = x.to_delayed(), _stride(x)
    fn = dask.delayed(_block_components, pure=True)
    return [[fn(blocks[i, j], (i * nx + j) * s,
                mo.TOP * (i == 0) | mo.BOTTOM * (i == ny - 1) | mo.LEFT * (j == 0)
                | mo.RIGHT * (j == nx - 1), n_classes, connectivity)
             for j in range(nx)] for i in range(ny)]


def merge_component_blocks(results: Sequence[Sequence[Any]], connectivity: int = 1,
                           ) -> tuple[mo.ComponentTable, np.ndarray, np.ndarray]:
    """Merge computed :func:`component_graph` results across chunk faces (union-find).

    Returns the merged table (one row per component of the whole mosaic) and the id map
    ``keys -> roots`` for :func:`semdask.analysis.morphology.relabel`.
    """
    ny, nx = len(results), len(results[0])

    def line(cells: Sequence[Any], side: str, k: int) -> np.ndarray:
        return np.concatenate([c[1][side][k] for c in cells])

    pairs = [np.zeros((0, 2), np.int64)]
    for i in range(ny - 1):
        a, b = results[i], results[i + 1]
        pairs.append(mo.face_pairs(line(a, "bottom", 0), line(b, "top", 0),
                                   line(a, "bottom", 1), line(b, "top", 1),
                                   connectivity=connectivity))
    for j in range(nx - 1):
        a, b = [r[j] for r in results], [r[j + 1] for r in results]
        pairs.append(mo.face_pairs(line(a, "right", 0), line(b, "left", 0),
                                   line(a, "right", 1), line(b, "left", 1),
                                   connectivity=connectivity))
    keys, roots = mo.merge_components(np.concatenate(pairs))
    t = mo.ComponentTable.concat([c[0] for row in results for c in row])
    ids = mo.relabel(t.ids, keys, roots)
    uniq, first, inv = np.unique(ids, return_index=True, return_inverse=True)
    area = np.zeros(len(uniq), np.int64)
    np.add.at(area, inv, t.area)
    flags = np.zeros(len(uniq), np.int64)
    np.bitwise_or.at(flags, inv, t.flags)
    return mo.ComponentTable(uniq, t.phase[first], area, flags), keys, roots


def label_components(labels: da.Array, n_classes: int, connectivity: int = 1) -> da.Array:
    """Connected components of every class, merged across chunks (int64 ids, 0 = unlabelled).

    Computes the merge first; the returned array is lazy. Each component has one id, whatever
    the chunking (the ids themselves depend on it).
    """
    x = da.asarray(labels)
    _, keys, roots = merge_component_blocks(dask.compute(component_graph(x, n_classes,
                                                                         connectivity))[0],
                                            connectivity)
    nx, s = x.numblocks[1], _stride(x)

    def f(b: np.ndarray, block_info: Any = None) -> np.ndarray:
        i, j = block_info[0]["chunk-location"]
        lab, _ = mo.label_block(b, n_classes, connectivity=connectivity)
        return mo.relabel(np.where(lab > 0, lab + (i * nx + j) * s, 0), keys, roots)

    return x.map_blocks(f, dtype=np.int64, meta=np.empty((0, 0), np.int64))


# ---------------------------------------------------------------- analysis of one label map


@dataclass
class Analysis:
    """Results for one region: tables as lists of row dicts (lengths in ``unit``)."""

    region: str
    shape: tuple[int, int]
    pixel_size_um: float | None
    classes: list[str]
    fractions: list[dict[str, Any]]
    interfaces: list[dict[str, Any]]
    tpb: dict[str, Any]
    connectivity: list[dict[str, Any]] = field(default_factory=list)
    sizes: list[dict[str, Any]] = field(default_factory=list)
    histogram: list[dict[str, Any]] = field(default_factory=list)

    @property
    def unit(self) -> str:
        """``um`` when the pixel size is known, else ``px``."""
        return "px" if self.pixel_size_um is None else "um"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "unit": self.unit}

    def to_dataframes(self) -> dict[str, Any]:
        """The tables as pandas DataFrames: ``fractions``, ``interfaces``, ``tpb``, ..."""
        from semdask.analysis.tables import analysis_frames

        return analysis_frames(self)


def analyze_labels(labels: Any, *, classes: Sequence[str], pixel_size_um: float | None = None,
                   tile: int = 2048, connectivity: int = 1, min_area_px: int = 9,
                   components: bool = True, truth: Any = None, region: str = "mosaic",
                   ) -> Analysis:
    """Analyse one label map (a dask or numpy ``(y, x)`` array of class ids).

    Parameters
    ----------
    labels : array
        Class ids; values ``>= len(classes)`` (e.g. 255) are unlabelled and ignored.
    classes : sequence of str
        Class names; TPB is computed when ``Ni``, ``YSZ`` and ``pore`` are among them.
    pixel_size_um : float, optional
        Pixel size; without it every length/area is in px.
    tile : int
        Tile edge (px) for the tile-to-tile spread and the 95 % confidence intervals.
    connectivity : {1, 2}
        4- or 8-connected components (connectivity and size statistics).
    min_area_px : int
        Components smaller than this are left out of the size statistics.
    components : bool
        Skip connectivity and sizes (the component labelling) when False.
    truth : array, optional
        Reference labels of the same region: adds ``truth_fraction`` and ``error_pp``.
    """
    x = da.asarray(labels)
    if x.ndim != 2:
        raise InputError("labels", expected="a 2-D (y, x) label map", got=f"shape {x.shape}")
    if int(tile) < 2:
        raise InputError("tile", expected="a tile edge >= 2 px", got=repr(tile))
    n, names, triple = len(classes), [str(c) for c in classes], mo.tpb_triple(classes)
    jobs: list[Any] = [tile_count_graph(x, n, int(tile)), boundary_count_graph(x, n, triple),
                       component_graph(x, n, connectivity) if components else None,
                       None if truth is None else class_counts(truth, n)]
    tiles, bc, comp, tcounts = dask.compute(*jobs)
    t = None if comp is None else merge_component_blocks(comp, connectivity)[0]
    tabs = mo.tables(names, tiles=tiles, boundary=bc, components=t, truth_counts=tcounts,
                     pixel_size_um=pixel_size_um, min_area_px=min_area_px, region=region,
                     triple=triple)
    if triple is None:
        log.warning("TPB: classes %s lack one of %s; TPB density not computed", names,
                    mo.TPB_PHASES)
    return Analysis(region, (int(x.shape[0]), int(x.shape[1])), pixel_size_um, names, **tabs)


def _open(mosaic: PathLike, labels: str, pixel_size_um: float | None) -> tuple[Any, float | None]:
    from semdask.storage import io as sio

    lab = sio.open_labels(mosaic, labels)
    px = pixel_size_um
    if px is None:
        px = (lab.attrs.get("semdask") or {}).get("pixel_size_um")
    if px is None:
        try:
            px = sio.open_mosaic(mosaic).pixel_size_um
        except SemdaskError:  # labels-only store: no image metadata
            px = None
    if px is None:
        log.warning("%s has no pixel size: results are in px (pass --pixel-size UM for µm)",
                    mosaic)
    return lab, px


def analyze(mosaic: PathLike, *, labels: str = "phases", rois: Sequence[str] = (),
            tile: int = 2048, connectivity: int = 1, min_area_px: int = 9,
            pixel_size_um: float | None = None, truth: str | None = None,
            components: bool = True) -> list[Analysis]:
    """Analyse ``<mosaic>/labels/<labels>``: the whole mosaic, then each ROI ``"y0:y1,x0:x1"``.

    Parameters
    ----------
    mosaic : path
        An OME-Zarr mosaic with a label group.
    labels : str
        The label group to analyse (``semdask segment`` writes ``phases``).
    rois : sequence of str
        Regions ``"y0:y1,x0:x1"`` (px) analysed after the whole mosaic.
    pixel_size_um : float, optional
        Overrides the store's pixel size (results in px when neither has one).
    truth : str, optional
        A reference label group (e.g. ``truth``) for the fraction errors.
    tile, connectivity, min_area_px, components
        As in :func:`analyze_labels`.

    Returns
    -------
    list of Analysis
        One per region: fractions with confidence intervals, connectivity, particle sizes,
        TPB density and interface lengths, in µm when the pixel size is known.
    """
    from semdask.storage import io as sio

    lab, px = _open(mosaic, labels, pixel_size_um)
    ref = sio.open_labels(mosaic, truth).data if truth else None
    H, W = lab.data.shape
    regions = [mo.Region("mosaic", 0, H, 0, W), *(mo.parse_roi(r, (H, W)) for r in rois)]
    out = []
    for r in regions:
        sl = (slice(r.y0, r.y1), slice(r.x0, r.x1))
        log.info("analyze %s: region %s", mosaic, r.name)
        out.append(analyze_labels(lab.data[sl], classes=lab.classes, pixel_size_um=px, tile=tile,
                                  connectivity=connectivity, min_area_px=min_area_px,
                                  components=components, region=r.name,
                                  truth=None if ref is None else ref[sl]))
    return out


# ---------------------------------------------------------------- time series


@dataclass
class Series:
    """Fractions of several mosaics against time; errors vs truth in percentage points."""

    rows: list[dict[str, Any]]
    errors: dict[str, dict[str, float]]
    time_unit: str

    def table(self, phase: str = "NiO") -> str:
        """A plain-text table of one phase against time."""
        lines = [f"{'time':>8} {self.time_unit:<4}{phase + ' %':>9}{'95% CI':>16}"
                 f"{'truth %':>9}{'err pp':>8}  mosaic"]
        for r in (r for r in self.rows if r["phase"] == phase):
            ci = ("-" if r["ci_low"] is None
                  else f"{100 * r['ci_low']:.2f}-{100 * r['ci_high']:.2f}")
            t = r.get("truth_fraction")
            lines.append(f"{r['time']:>8g}     {100 * r['fraction']:>9.2f}{ci:>16}"
                         + (f"{100 * t:>9.2f}{r['error_pp']:>+8.2f}" if t is not None
                            else f"{'-':>9}{'-':>8}") + f"  {r['mosaic']}")
        if phase in self.errors:
            e = self.errors[phase]
            lines.append(f"{phase}: MAE {e['mae_pp']:.2f} pp, RMSE {e['rmse_pp']:.2f} pp "
                         f"over {e['n']} mosaics")
        return "\n".join(lines)


def analyze_series(items: Sequence[tuple[PathLike, float] | str], *, labels: str = "phases",
                   truth: str | None = None, time_unit: str = "min", tile: int = 2048,
                   pixel_size_um: float | None = None) -> Series:
    """Phase fractions (with 95 % CI) of each mosaic against its time, like the paper's fig. 8.

    ``items`` are ``(mosaic, time)`` pairs or ``"MOSAIC:TIME"`` strings. With ``truth`` (a
    reference label group in each mosaic), ``errors[phase]`` holds the MAE and RMSE in
    percentage points over the series.
    """
    pairs = [mo.parse_series_item(i) if isinstance(i, str) else (i[0], float(i[1])) for i in items]
    if not pairs:
        raise InputError("series", expected="at least one MOSAIC:TIME", got="none")
    from semdask.storage import io as sio

    rows: list[dict[str, Any]] = []
    for path, t in sorted(pairs, key=lambda p: p[1]):
        lab, px = _open(path, labels, pixel_size_um)
        a = analyze_labels(lab.data, classes=lab.classes, pixel_size_um=px, tile=tile,
                           components=False, region=str(path),
                           truth=sio.open_labels(path, truth).data if truth else None)
        rows += [{"time": t, "mosaic": str(path), **{k: v for k, v in r.items()
                                                      if k != "region"}} for r in a.fractions]
    errors = {}
    for ph in dict.fromkeys(r["phase"] for r in rows):
        e = np.array([r["error_pp"] for r in rows if r["phase"] == ph and "error_pp" in r])
        if e.size:
            errors[ph] = {"mae_pp": float(np.abs(e).mean()), "rmse_pp": float(
                np.sqrt((e**2).mean())), "std_abs_pp": float(np.abs(e).std()), "n": int(e.size)}
    return Series(rows, errors, time_unit)
