"""Export any semdask output for other tools: OME-NGFF 0.4 (Zarr v2) and calibrated TIFF.

* :func:`export_ngff04`: the image pyramid, its labels and any sibling image groups
  (``probs``, ``confidence``, ...) as an OME-NGFF 0.4 / Zarr v2 store for Fiji
  (MoBIE, n5-viewer), QuPath and older napari. Marked incomplete until every array is
  written.
* :func:`export_tiff`: one group (the image, ``labels/<name>`` or a sibling image) as a
  tiled, pyramidal OME-TIFF (BigTIFF when large) with the pixel size in µm
  (``PhysicalSizeX/Y``, read by Fiji/Bio-Formats and QuPath) and the TIFF resolution
  tags. It is written tile by tile, one band of tiles in memory at a time, never the
  whole mosaic, into ``OUT.partial`` that is renamed to ``OUT`` only once complete.

Examples
--------
>>> import tempfile, numpy as np, dask.array as da, tifffile
>>> from semdask.storage import io
>>> d = tempfile.mkdtemp()
>>> img = da.from_array(np.arange(300 * 200, dtype=np.uint16).reshape(300, 200), chunks=128)
>>> m = io.write_image(f"{d}/m.ome.zarr", img, pixel_size_um=0.25, levels=2)
>>> out = export_tiff(m.path, f"{d}/m.ome.tif", tile=64)
>>> with tifffile.TiffFile(out) as t:
...     s = t.series[0]
...     bool((s.asarray() == img.compute()).all()), len(s.levels), t.is_ome
(True, 2, True)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from semdask import config
from semdask.errors import InputError, StoreError, UnsafePathError
from semdask.paths import validate_input_path, validate_output_path
from semdask.storage import ome
from semdask.storage.arrays import align_to, read_attrs, set_complete, store_blocks
from semdask.storage.io import open_extra_image, open_labels, open_mosaic

__all__ = ["FORMATS", "export", "export_ngff04", "export_tiff", "groups_of"]

log = logging.getLogger(__name__)
PathLike = str | Path
FORMATS = ("ngff04", "tiff")
_TIFF_SUFFIXES = (".tif", ".tiff")


# ------------------------------------------------------------------ groups


def groups_of(path: PathLike) -> dict[str, list[str]]:
    """The exportable groups of a store: ``{"labels": [...], "images": [...]}``.

    ``images`` are the complete sibling image groups (``probs``, ``confidence``, ...).
    """
    p = validate_input_path(path, kind="dir")
    try:
        labels = list((read_attrs(p, "labels").get("ome") or {}).get("labels", []))
    except StoreError:
        labels = []
    root = zarr.open_group(store=str(p), mode="r")
    images = []
    for name, g in root.groups():
        attrs: dict[str, Any] = dict(g.attrs.asdict())
        if name == "labels" or not ome.multiscales_of(attrs):
            continue
        if (attrs.get("semdask") or {}).get("complete") is not False:
            images.append(name)
    return {"labels": labels, "images": sorted(images)}


def _level_of(p: Path, group: str, level: int) -> tuple[da.Array, dict[str, Any]]:
    """Level ``level`` of ``group`` ("" = image) with the group's attributes (checked)."""
    if group in ("", "image"):
        m = open_mosaic(p)
        return (m.image if level == 0 else m.level(level)), m.attrs
    if group.startswith("labels/"):
        lab = open_labels(p, group.split("/", 1)[1])
        return (lab.data if level == 0 else lab.level(level)), lab.attrs
    x = open_extra_image(p, group, level)
    return x, read_attrs(p, group)


def _n_levels(attrs: dict[str, Any]) -> int:
    return len(ome.multiscales_of(attrs)[0]["datasets"])


# ------------------------------------------------------------------ NGFF 0.4


def _copy_v2(g: zarr.Group, levels: Sequence[da.Array], chunk: int) -> None:
    import numcodecs

    clevel = int(config.get("store.compressor-level", 5))
    comp = numcodecs.Blosc(cname="zstd", clevel=clevel, shuffle=numcodecs.Blosc.SHUFFLE)
    for i, x in enumerate(levels):
        chunks = (*x.shape[:-2], chunk, chunk)  # whole channel axis, y/x tiles
        arr = g.create_array(str(i), shape=x.shape, dtype=x.dtype, chunks=chunks,
                             compressors=comp, fill_value=0,
                             chunk_key_encoding={"name": "v2", "separator": "/"})
        store_blocks([align_to(x, arr)], [arr])


def export_ngff04(src: PathLike, dst: PathLike, *, groups: Sequence[str] | None = None,
                  overwrite: bool = False, chunk: int = 1024) -> Path:
    """Copy a store's image pyramid, labels and sibling images to OME-NGFF 0.4 (Zarr v2).

    Parameters
    ----------
    src : path
        A semdask OME-Zarr 0.5 store.
    dst : path
        The new Zarr v2 store (refused when it exists, unless ``overwrite``).
    groups : sequence of str, optional
        Which groups besides the image: ``"labels/<name>"`` and sibling image names
        (``"probs"``...). Default: every label image; sibling images only when named.
    overwrite : bool
        Replace an existing output store.
    chunk : int
        Edge of the unsharded y/x chunks.
    """
    m = open_mosaic(src)
    have = groups_of(m.path)
    labels, images = _select(m.path, groups, have)
    p = validate_output_path(dst, overwrite=overwrite, input_path=m.path)
    sem = {**(m.attrs.get("semdask") or {}), "exported_from": str(m.path), "complete": False}
    root = zarr.create_group(store=str(p), zarr_format=2, attributes={
        **ome.image_attrs(m.levels, pixel_size_um=m.pixel_size_um, name=m.path.name,
                          version="0.4"), "semdask": sem})
    _copy_v2(root, [m.level(i) for i in range(m.levels)], chunk)
    for name in images:
        attrs = read_attrs(m.path, name)
        n = _n_levels(attrs)
        levels = [open_extra_image(m.path, name, i) for i in range(n)]
        names = "cyx" if levels[0].ndim == 3 else "yx"
        px = ome.pixel_size_of(attrs)
        root.create_group(name, attributes={
            **ome.image_attrs(n, pixel_size_um=px, names=names, name=name, version="0.4"),
            "semdask": attrs.get("semdask") or {}})
        _copy_v2(root[name], levels, chunk)  # type: ignore[arg-type]
    if labels:
        lg = root.create_group("labels", attributes=ome.labels_attrs(labels, version="0.4"))
        for name in labels:
            lab = open_labels(m.path, name)
            g = lg.create_group(name, attributes=ome.image_label_attrs(
                lab.levels, classes=lab.classes, colours=lab.colours,
                pixel_size_um=m.pixel_size_um, name=name, version="0.4"))
            _copy_v2(g, [lab.level(i) for i in range(lab.levels)], chunk)
    set_complete(p)
    log.info("export: wrote %s (NGFF 0.4: image, labels %s, images %s)", p, labels, images)
    return p


def _select(p: Path, groups: Sequence[str] | None,
            have: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    if groups is None:
        return list(have["labels"]), []
    labels, images = [], []
    for g in (s.strip("/") for s in groups):
        if g in ("", "image"):
            continue
        if g.startswith("labels/") and g.split("/", 1)[1] in have["labels"]:
            labels.append(g.split("/", 1)[1])
        elif g in have["images"]:
            images.append(g)
        else:
            known = ["image", *(f"labels/{n}" for n in have["labels"]), *have["images"]]
            raise InputError("--group", expected=f"one of {known}", got=repr(g),
                             fix=f"--group {known[-1] if len(known) > 1 else 'image'}")
    return labels, images


# ------------------------------------------------------------------ TIFF


def _tiff_output(dst: PathLike, *, overwrite: bool, input_path: Path) -> Path:
    raw = Path(dst).expanduser()
    p = raw.resolve()
    if p.suffix.lower() not in _TIFF_SUFFIXES:
        raise InputError(str(raw), expected="a .tif or .tiff output file",
                         got=f"suffix {p.suffix!r}", fix=f"use {p.with_suffix('.ome.tif')}")
    if p == input_path or p.is_relative_to(input_path):
        raise UnsafePathError(f"output {p}", expected="a path outside the input",
                              got=f"a path inside the input store {input_path}",
                              fix=f"write it beside the store: {input_path.parent / p.name}")
    if raw.is_symlink() or p.is_dir():
        raise UnsafePathError(f"output {p}", expected="a new file path",
                              got="a symlink" if raw.is_symlink() else "a directory",
                              fix="choose another output path")
    if p.exists() and not overwrite:
        raise UnsafePathError(f"output {p}", expected="a new file path", got="an existing file",
                              fix="pass --overwrite to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _tiles(x: da.Array, tile: int) -> Iterator[np.ndarray]:
    """Tiles of ``x`` ((y, x) or (c, y, x)) in TIFF order: per plane, rows of tiles.

    One band of ``tile`` rows (all columns) is computed at a time.
    """
    planes = x if x.ndim == 3 else x[None]
    h, w = planes.shape[-2:]
    for c in range(planes.shape[0]):
        for y0 in range(0, h, tile):
            band = np.asarray(planes[c, y0: y0 + tile].compute())
            for x0 in range(0, w, tile):
                yield np.ascontiguousarray(band[:, x0: x0 + tile])


def _tiff_dtype(x: da.Array) -> da.Array:
    if x.dtype == np.float16:  # OME-TIFF has no half floats
        return x.astype(np.float32)
    if x.dtype == np.bool_:
        return x.astype(np.uint8)
    return x


def export_tiff(src: PathLike, dst: PathLike, *, group: str = "", level: int = 0,
                overwrite: bool = False, tile: int = 512,
                compression: str | None = "zlib") -> Path:
    """Write one group of a store as a tiled, pyramidal, µm-calibrated OME-TIFF.

    Parameters
    ----------
    src : path
        A semdask OME-Zarr 0.5 store.
    dst : path
        Output ``.tif``/``.tiff`` (``.ome.tif`` recommended).
    group : str
        ``""``/``"image"``, ``"labels/<name>"`` or a sibling image group (``"probs"``:
        one page per class, named after it).
    level : int
        First pyramid level written (0 = full resolution); the coarser stored levels
        follow as OME-TIFF sub-resolutions.
    overwrite : bool
        Replace an existing file.
    tile : int
        Tile edge (multiple of 16).
    compression : str or None
        A tifffile compression (``"zlib"``, ``"zstd"``, None).
    """
    import tifffile

    if tile < 16 or tile % 16:
        raise InputError("tile", expected="a multiple of 16 px", got=repr(tile), fix="tile=512")
    p = validate_input_path(src, kind="dir")
    g = group.strip("/")
    x, attrs = _level_of(p, g, level)  # refuses incomplete or damaged outputs
    n = _n_levels(attrs)
    levels = [_tiff_dtype(x)] + [_tiff_dtype(_level_of(p, g, i)[0]) for i in range(level + 1, n)]
    out = _tiff_output(dst, overwrite=overwrite, input_path=p)
    px = ome.pixel_size_of(attrs)
    axes = "CYX" if x.ndim == 3 else "YX"
    meta: dict[str, Any] = {"axes": axes, "Name": f"{p.name}/{g or 'image'}"}
    if px is not None:
        s = px * 2.0**level
        meta.update(PhysicalSizeX=s, PhysicalSizeXUnit="µm", PhysicalSizeY=s,
                    PhysicalSizeYUnit="µm")
    channels = (attrs.get("semdask") or {}).get("channels")
    if x.ndim == 3 and channels:
        meta["Channel"] = {"Name": [str(c) for c in channels]}
    if g.startswith("labels/"):
        classes, _ = ome.label_info(attrs)
        meta["Description"] = "class ids: " + ", ".join(f"{i}={c}" for i, c in enumerate(classes))
    nbytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in levels)
    tmp = out.with_name(out.name + ".partial")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=nbytes > 2**31, ome=True) as tw:
            for i, v in enumerate(levels):
                res = None if px is None else (1e4 / (px * 2.0 ** (level + i)),) * 2
                kw: dict[str, Any] = {"metadata": meta} if i == 0 else {"subfiletype": 1}
                tw.write(_tiles(v, tile), shape=v.shape, dtype=v.dtype, tile=(tile, tile),
                         compression=compression, photometric="minisblack",
                         subifds=len(levels) - 1 if i == 0 else None,
                         resolution=res, resolutionunit="CENTIMETER" if res else None, **kw)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("export: wrote %s (%s level %d, %d sub-resolutions, pixel size %s µm)", out,
             g or "image", level, len(levels) - 1, px)
    return out


def export(src: PathLike, dst: PathLike, *, fmt: str = "ngff04",
           groups: Sequence[str] | None = None, level: int | None = None,
           overwrite: bool = False) -> list[Path]:
    """Export a store to ``fmt`` (``"ngff04"`` or ``"tiff"``): the ``semdask export`` arrow.

    ``tiff`` writes one file per group: ``dst`` itself for one group, else
    ``dst``'s directory gets ``<stem>.<group>.ome.tif`` per group. ``level`` is for
    ``tiff`` only (NGFF 0.4 keeps the whole pyramid).
    """
    if fmt not in FORMATS:
        raise InputError("--format", expected=f"one of {list(FORMATS)}", got=repr(fmt),
                         fix="--format ngff04")
    if fmt == "ngff04":
        if level not in (None, 0):
            raise InputError("--level", expected="no --level with --format ngff04 (the whole "
                             "pyramid is copied)", got=repr(level), fix="--format tiff --level N")
        return [export_ngff04(src, dst, groups=groups, overwrite=overwrite)]
    gs = list(groups or ["image"])
    if len(gs) == 1:
        return [export_tiff(src, dst, group=gs[0], level=level or 0, overwrite=overwrite)]
    d = Path(dst)
    stem = d.name.split(".")[0]
    return [export_tiff(src, d.parent / f"{stem}.{g.strip('/').replace('/', '-')}.ome.tif",
                        group=g, level=level or 0, overwrite=overwrite) for g in gs]
