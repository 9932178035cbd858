"""Convert SEM images and tile grids into OME-Zarr mosaics (``semdask convert``).

Three kinds of input:

- one image (TIFF/BigTIFF, PNG, JPEG, BMP; see :mod:`semdask.ingest.readers`) -> one mosaic;
- several images or a folder of images -> one mosaic per image with
  :func:`convert_each` (``OUT/<stem>.ome.zarr``; the CLI does this when given a folder
  without ``--tile-offsets``);
- a tile grid: images plus an offsets CSV (``file,y,x`` in pixels, header required;
  ``file`` relative to the CSV's folder or to the input folder) -> one fused mosaic.
  Overlaps are blended linearly (feathering): each tile's weight is the product of
  its distances (+0.5 px) to its own edges along y and x, so across an overlap
  between two tiles the weights ramp linearly and the seam becomes a linear
  ramp. Fusion is lazy: each output chunk reads only the tile regions overlapping it.

Label images (``labels=``: one file for one image; a folder matched by file stem for
:func:`convert_each`) are imported as an OME labels group (``labels/truth`` by
default) with class names, colours and a mode pyramid, ready for ``semdask train
--labels truth``. Values are class indices; 255 is kept as "ignore" (unlabelled).
Everything is checked (shape, values, a label for every image) before anything is
written, and the store is marked complete only once its labels are.

The pixel size comes from the file's metadata, following each vendor's conventions
(FEI/Thermo Fisher, Zeiss, TESCAN, Hitachi, JEOL, OME-TIFF, ImageJ/Fiji: see
:mod:`semdask.ingest.vendors`), or from ``pixel_size_um``; the argument wins over a
differing value (with a warning). The generic TIFF resolution tags are not trusted.
With no pixel size at all the mosaic is stored without one, as unknown (a warning
gives the ``--pixel-size`` fix). ``attrs["semdask"]["source"]["pixel_size_from"]``
names the field used.

Instrument data bars are removed from the metadata first: by default
(``crop_databar=None``) the rows the metadata declares (FEI ``DatabarHeight``,
JEOL/Hitachi image size) are cropped; where none is declared a detected bar is
cropped in instrument exports (Zeiss, TESCAN: with a warning) and only reported
in other images; ``crop_databar=True`` crops a detected bar in any image
(:func:`semdask.ingest.databar.databar_rows`), ``crop_databar=ROWS`` drops ROWS
rows (0: none) and ``False`` crops nothing. In a
tile grid every tile is cropped before fusing, so the CSV offsets refer to cropped
tiles. ``source["databar_from"]`` records why rows were cropped.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from semdask.errors import InputError, UnsafePathError
from semdask.inference.windows import align_up
from semdask.ingest.databar import crop_databar as _crop
from semdask.ingest.labelimport import (
    IGNORE,
    LabelledImage,
    match_labels,
    open_item,
    read_classes,
    resolve_classes,
)
from semdask.ingest.readers import IMAGE_SUFFIXES, ImageFile, open_image
from semdask.ingest.tilegrid import TileGrid, read_tile_offsets
from semdask.paths import validate_output_path
from semdask.storage import arrays as sarr
from semdask.storage import io as sio

__all__ = [
    "convert",
    "convert_each",
    "image_to_dask",
    "read_classes",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
_DEFAULT_CHUNK = 2048


def _expand(inputs: Sequence[PathLike] | PathLike) -> list[Path]:
    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir()
                           if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{p}", expected="a folder with image files",
                                 got="no *.tif/*.png/... files", fix="check the folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UnsafePathError(f"{p}", expected="an existing image file or folder",
                                  got="nothing at that path", fix="check the path")
    if not files:
        raise InputError("inputs", expected="at least one image", got="none")
    return files


def _chunks(img: ImageFile, chunk: int) -> tuple[int, int]:
    sh, sw = img.segment
    if img.fmt != "tiff" or img.memmappable:
        return chunk, chunk
    if sw >= img.shape[1] and sh < img.shape[0]:  # strips: full-width chunks, decode once
        return align_up(chunk, sh), img.shape[1]
    return align_up(chunk, sh), align_up(chunk, sw)


def image_to_dask(source: ImageFile | TileGrid, chunk: int = _DEFAULT_CHUNK) -> da.Array:
    """A lazy dask array over an image file or tile grid; each chunk reads only its region.

    Chunks are ``chunk`` px, rounded up to whole TIFF tiles (full-width for striped,
    compressed TIFFs so that every strip is decoded once).
    """
    if isinstance(source, ImageFile):
        chunks = _chunks(source, chunk)
        token = f"{source.path}-{source.path.stat().st_mtime_ns}-{source.page}-{source.shape}"
    else:
        chunks = (chunk, chunk)
        token = repr([(str(t.path), t.shape, o) for t, o in zip(source.tiles, source.offsets,
                                                                  strict=True)])
    name = f"convert-{source.__class__.__name__}-{tokenize(token, chunks)}"
    return da.from_array(source, chunks=chunks, lock=False, asarray=False, fancy=False,
                         meta=np.empty((0, 0), source.dtype), name=name)


def _pixel_size(tag_um: float | None, vendor: str | None, flag_um: float | None) -> float | None:
    if flag_um is not None:
        if not (math.isfinite(flag_um) and flag_um > 0):
            raise InputError("pixel_size_um", expected="a positive size in micrometres",
                             got=repr(flag_um), fix="e.g. --pixel-size 0.01 for 10 nm pixels")
        if tag_um is not None and not math.isclose(tag_um, flag_um, rel_tol=1e-3):
            log.warning("--pixel-size %g um overrides the %s metadata (%g um)", flag_um, vendor,
                        tag_um)
        return float(flag_um)
    if tag_um is None:
        log.warning("pixel size unknown: no vendor, OME-TIFF or ImageJ calibration in the "
                    "file and none given, so µm figures cannot be computed. Fix: pass it, "
                    "e.g. `semdask convert IMAGE OUT --pixel-size 0.01` (µm per pixel) or "
                    "convert(..., pixel_size_um=0.01)")
    return tag_um


def convert(
    inputs: Sequence[PathLike] | PathLike,
    out: PathLike,
    *,
    pixel_size_um: float | None = None,
    crop_databar: bool | int | None = None,
    tile_offsets: PathLike | None = None,
    chunk: int | None = None,
    ngff: str = "0.5",
    overwrite: bool = False,
    page: int | None = None,
    labels: PathLike | None = None,
    labels_name: str = "truth",
    classes: Sequence[str] | None = None,
) -> sio.Mosaic:
    """Convert one image (optionally with its label image), or a tile grid, into OME-Zarr.

    Parameters
    ----------
    inputs : path-like or sequence of path-like
        One image file; or, with ``tile_offsets``, the tiles (files and/or folders).
    out : path-like
        The ``.ome.zarr`` store to write.
    pixel_size_um : float, optional
        Pixel size in micrometres; wins over the file's metadata.
    crop_databar : bool, int or None
        ``None``: crop the data bar the metadata declares (else a detected one in an
        instrument export); ``True``: declared, else detected, in any image; an int:
        that many bottom rows (0: none); ``False``: nothing. See
        :func:`semdask.ingest.databar.crop_databar`.
    tile_offsets : path-like, optional
        CSV ``file,y,x`` (pixels): fuse the inputs into one mosaic with linear blending.
    chunk : int, optional
        Chunk (shard) edge in pixels for reading and writing (default: the store's).
    ngff : {"0.5", "0.4"}
        ``"0.4"`` also writes an NGFF 0.4 export (for Fiji/QuPath) via
        :func:`semdask.storage.export.export_ngff04`.
    overwrite : bool
        Replace an existing store.
    page : int, optional
        Page of a multi-page TIFF to convert (single image only).
    labels : path-like, optional
        A label image of the same shape (uint8 class indices, 255 = ignore; a
        palette PNG's indices are used) to store as ``labels/<labels_name>``. With a
        cropped data bar it may have the cropped or the uncropped shape.
    labels_name : str
        Name of the label group (``"truth"``: what ``semdask train`` reads by default).
    classes : sequence of str, optional
        Class names by label value (default ``class 0``, ``class 1``, ... up to the
        largest value found). See :func:`read_classes`.

    Returns
    -------
    semdask.storage.io.Mosaic
        The written mosaic; ``attrs`` carry ``source`` (files, vendor, cropped rows).

    Raises
    ------
    UnsafePathError
        Missing inputs, or ``out`` exists and ``overwrite`` is False.
    InputError
        Unreadable images, several images without ``tile_offsets``, bad CSV or options,
        labels of another shape or with values outside the classes (nothing is written).
    """
    edge = _check_options(ngff, chunk)
    files = _expand(inputs)
    if tile_offsets is not None:
        if labels is not None:
            raise InputError("labels", expected="no label image for a tile grid",
                             got=str(labels), fix="convert the fused mosaic's labels as "
                             "one image of the same shape, or drop --labels")
        image, tag_um, vendor, source = _fuse(files, tile_offsets, crop_databar, edge)
        px = _pixel_size(tag_um, vendor, pixel_size_um)
        if pixel_size_um is not None:
            source["pixel_size_from"] = "argument"
        return _write(image, out, px, source, None, ngff=ngff, edge=edge, overwrite=overwrite)
    if len(files) != 1:
        raise InputError(
            "inputs", expected="one image (or a tile grid with tile_offsets)",
            got=f"{len(files)} images",
            fix="pass --tile-offsets offsets.csv to fuse them, or convert_each()/"
            "`semdask convert FOLDER OUTDIR` to write one store per image",
        )
    lab = None if labels is None else Path(labels).expanduser()
    if lab is not None and lab.is_dir():
        lab = match_labels(files, lab)[0]
    item = open_item(files[0], lambda im: _crop(im, crop_databar), lab, edge, page)
    cls = resolve_classes([item], classes)
    return _write_item(item, out, cls, labels_name, pixel_size_um=pixel_size_um, ngff=ngff,
                       edge=edge, overwrite=overwrite)


def _check_options(ngff: str, chunk: int | None) -> int:
    if ngff not in ("0.5", "0.4"):
        raise InputError("ngff", expected="'0.5' or '0.4'", got=repr(ngff))
    if chunk is not None and chunk <= 0:
        raise InputError("chunk", expected="a positive edge in pixels", got=repr(chunk))
    return chunk or _DEFAULT_CHUNK


def _px_from(flag_um: float | None, img: ImageFile) -> str | None:
    """Where the stored pixel size came from: ``"argument"``, a metadata field or None."""
    if flag_um is not None:
        return "argument"
    return img.pixel_size_from if img.pixel_size_um is not None else None


def _write(image: da.Array, out: PathLike, px: float | None, source: dict[str, Any],
           labels: tuple[da.Array, list[str], dict[str, Any], str] | None, *, ngff: str,
           edge: int, overwrite: bool) -> sio.Mosaic:
    """Write the image (and labels: the store is complete only once they are)."""
    mosaic = sio.write_image(Path(out), image, pixel_size_um=px, chunk=edge,
                             attrs={"source": source}, overwrite=overwrite)
    if labels is not None:
        lab, cls, attrs, name = labels
        sarr.set_complete(mosaic.path, "", False)
        sio.write_labels(mosaic.path, lab, name=name, classes=cls, attrs=attrs, chunk=edge)
        sarr.set_complete(mosaic.path, "", True)
        mosaic = sio.open_mosaic(mosaic.path)
    if ngff == "0.4":
        from semdask.storage.export import export_ngff04

        dst = Path(str(mosaic.path).removesuffix(".ome.zarr") + ".ngff04.ome.zarr")
        export_ngff04(mosaic.path, dst, overwrite=overwrite)
    return mosaic


def _write_item(item: LabelledImage, out: PathLike, classes: list[str] | None, labels_name: str, *,
                pixel_size_um: float | None, ngff: str, edge: int,
                overwrite: bool) -> sio.Mosaic:
    img = item.image
    source: dict[str, Any] = {"files": [str(img.path)], "vendor": img.vendor,
                              "cropped_rows": item.rows, "databar_from": img.crop_from,
                              "pixel_size_from": _px_from(pixel_size_um, img)}
    px = _pixel_size(img.pixel_size_um, img.vendor, pixel_size_um)
    labels = None
    if item.label is not None and item.counts is not None and classes is not None:
        lab = image_to_dask(item.label, edge)
        lab = lab if lab.dtype == np.uint8 else lab.astype(np.uint8)
        attrs = {"source": {"files": [str(item.label.path)], "imported": True},
                 "ignore_value": IGNORE, "ignored_pixels": int(item.counts[IGNORE]),
                 "class_pixels": {c: int(item.counts[i]) for i, c in enumerate(classes)}}
        labels = (lab, classes, attrs, labels_name)
        source["labels"] = str(item.label.path)
    return _write(image_to_dask(img, edge), out, px, source, labels, ngff=ngff, edge=edge,
                  overwrite=overwrite)


def _fuse(
    files: list[Path], csv_path: PathLike, crop: bool | int | None, edge: int
) -> tuple[da.Array, float | None, str | None, dict[str, Any]]:
    rows = read_tile_offsets(csv_path)
    csv_dir = Path(csv_path).expanduser().resolve().parent
    by_path = {f.resolve(): f for f in files}
    by_name: dict[str, list[Path]] = {}
    for f in files:
        by_name.setdefault(f.name, []).append(f)
    tiles, offsets, names, cropped = [], [], [], []
    for name, y, x in rows:
        hit = by_path.get((csv_dir / name).resolve())
        if hit is None and len(by_name.get(Path(name).name, [])) == 1:
            hit = by_name[Path(name).name][0]
        if hit is None:
            raise InputError(f"tile {name!r} of {csv_path}", expected="one of the input images",
                             got=f"no match among {len(files)} inputs",
                             fix="pass the tiles' folder (or files) that the CSV lists")
        tile, n = _crop(open_image(hit), crop)
        tiles.append(tile)
        offsets.append((y, x))
        names.append(str(hit))
        cropped.append(n)
    unused = set(by_path.values()) - {Path(n) for n in names}
    if unused:
        log.warning("%d input images are not in %s and are ignored", len(unused), csv_path)
    grid = TileGrid(tiles, offsets)
    sizes = {t.pixel_size_um for t in tiles}
    if len(sizes) > 1:
        log.warning("tiles carry different pixel sizes %s; using the first",
                    sorted(map(str, sizes)))
    image = image_to_dask(grid, edge)
    source = {"files": names, "offsets": grid.offsets, "vendor": tiles[0].vendor,
              "cropped_rows": cropped, "databar_from": [t.crop_from for t in tiles],
              "pixel_size_from": _px_from(None, tiles[0]),
              "tile_offsets": str(csv_path), "blending": "linear"}
    log.info("tile grid: %d tiles fused into %s", len(tiles), grid.shape)
    return image, tiles[0].pixel_size_um, tiles[0].vendor, source


def convert_each(
    inputs: Sequence[PathLike] | PathLike, out_dir: PathLike, *,
    labels: PathLike | None = None, labels_name: str = "truth",
    classes: Sequence[str] | None = None, **kwargs: Any,
) -> list[sio.Mosaic]:
    """Convert every image of ``inputs`` (files and/or folders) to ``OUT_DIR/<stem>.ome.zarr``.

    ``labels`` is a folder of label images matched by file stem (every image needs
    one; all are checked before anything is written), stored as
    ``labels/<labels_name>`` with one shared class list. Other keyword arguments
    are those of :func:`convert` (except ``tile_offsets``).
    """
    if kwargs.get("tile_offsets") is not None:
        raise InputError("tile_offsets", expected="None for convert_each",
                         got=repr(kwargs["tile_offsets"]), fix="use convert() for a tile grid")
    kwargs.pop("tile_offsets", None)
    files = _expand(inputs)
    stems = [f.stem for f in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise InputError("inputs", expected="distinct file stems", got=f"duplicates {dupes}",
                         fix="rename the files or convert them separately")
    root = Path(out_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise UnsafePathError(f"{root}", expected="a folder for the stores", got="a file")
    if labels is None:
        root.mkdir(parents=True, exist_ok=True)
        return [convert([f], root / f"{f.stem}.ome.zarr", **kwargs) for f in files]
    edge = _check_options(kwargs.get("ngff", "0.5"), kwargs.get("chunk"))
    matched = match_labels(files, Path(labels).expanduser())
    overwrite = bool(kwargs.get("overwrite", False))
    if not overwrite:  # refuse before anything is written (overwrite deletes only later)
        for q in (root / f"{f.stem}.ome.zarr" for f in files):
            if q.exists() or q.is_symlink():
                validate_output_path(q, overwrite=False)
    crop = kwargs.get("crop_databar")
    items = [open_item(f, lambda im: _crop(im, crop), lab, edge, kwargs.get("page"))
             for f, lab in zip(files, matched, strict=True)]
    cls = resolve_classes(items, classes)
    root.mkdir(parents=True, exist_ok=True)
    return [_write_item(it, root / f"{f.stem}.ome.zarr", cls, labels_name,
                        pixel_size_um=kwargs.get("pixel_size_um"), ngff=kwargs.get("ngff", "0.5"),
                        edge=edge, overwrite=overwrite) for f, it in zip(files, items, strict=True)]
