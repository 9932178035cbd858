"""Mosaics, labels and probabilities as dask-backed :class:`xarray.DataArray` objects.

:func:`open_dataarray` reads one group of a semdask store (the image, ``labels/<name>``
or a sibling image group such as ``probs`` or ``confidence``) at one pyramid level and
wraps its dask array, chunk for chunk and without a copy, in a DataArray with named
dims ``("y", "x")`` (``("c", "y", "x")`` for per-class arrays) and physical coordinates.

Coordinates are the *centres* of the pixels in micrometres: pixel ``i`` of a level whose
stored OME scale is ``s`` (pixel size x 2**level) lies at ``t + (i + 0.5) * s``, where
``t`` is the stored translation (0 for semdask stores), i.e. the top-left corner of the
mosaic is at 0 µm on every level and the levels line up. When the pixel size is unknown
the same formula gives level-0 pixel units and the coordinates say ``units: "pixel"``.
So ``da.sel(x=slice(0, 10))`` is the first 10 µm of the mosaic (pixels whose centre is in
[0, 10] µm), and label classes, colours and the store's provenance travel in ``attrs``
(CF ``flag_values`` / ``flag_meanings`` for labels).

The same integrity rules as every other reader apply: incomplete outputs are refused and
labels written by ``semdask segment`` are checked against their ledger as they are read.

Examples
--------
>>> import tempfile, numpy as np, dask.array as da
>>> from semdask.storage import io
>>> d = tempfile.mkdtemp()
>>> img = da.from_array(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80), chunks=32)
>>> m = io.write_image(f"{d}/m.ome.zarr", img, pixel_size_um=0.5, levels=2)
>>> x = open_dataarray(m.path)
>>> x.dims, x.shape, float(x.x[0]), x.x.attrs["units"]
(('y', 'x'), (64, 80), 0.25, 'um')
>>> int(x.sel(y=slice(0, 4), x=slice(0, 2)).size)  # 8 x 4 pixels of 0.5 µm
32
>>> float(open_dataarray(m.path, level=1).x[0])  # level 1: 1 µm pixels, centre 0.5 µm
0.5
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from semdask.errors import InputError
from semdask.paths import validate_input_path
from semdask.storage import ome
from semdask.storage.arrays import read_attrs
from semdask.storage.io import Labels, Mosaic, open_extra_image, open_labels, open_mosaic

__all__ = ["open_dataarray", "to_dataarray"]

PathLike = str | Path


def _transform(attrs: dict[str, Any], level: int) -> tuple[list[dict[str, Any]],
                                                           list[float], list[float]]:
    """Axes, scale and translation of ``level`` from the group's ``multiscales``."""
    ms = ome.multiscales_of(attrs)
    if not ms:
        raise InputError("group", expected="an OME-Zarr image group (multiscales)",
                         got="a group without multiscales metadata")
    datasets = ms[0]["datasets"]
    if not 0 <= level < len(datasets):
        raise InputError("level", expected=f"a pyramid level 0..{len(datasets) - 1}",
                         got=repr(level), fix=f"pass level=0 .. {len(datasets) - 1}")
    axes = list(ms[0]["axes"])
    scale = [1.0] * len(axes)
    trans = [0.0] * len(axes)
    for t in datasets[level].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            trans = [float(v) for v in t["translation"]]
    return axes, scale, trans


def _coords(x: da.Array, attrs: dict[str, Any], level: int, *,
            channels: list[str] | None) -> tuple[tuple[str, ...], dict[str, Any]]:
    axes, scale, trans = _transform(attrs, level)
    names = tuple(str(a["name"]) for a in axes)
    # stores may keep leading singleton axes (t, c, z); the readers squeeze them away
    names = names[len(names) - x.ndim:]
    scale, trans, axes = scale[-x.ndim:], trans[-x.ndim:], axes[-x.ndim:]
    coords: dict[str, Any] = {}
    for dim, n, ax, s, t in zip(names, x.shape, axes, scale, trans, strict=True):
        if ax.get("type") != "space":
            if channels is not None and len(channels) == n:
                coords[dim] = (dim, list(channels))
            continue
        known = ax.get("unit") == "micrometer"
        values = t + (np.arange(n, dtype=np.float64) + 0.5) * s
        coords[dim] = (dim, values, {
            "units": "um" if known else "pixel",
            "long_name": f"{dim} (pixel centres)",
            "pixel_size": s,
            **({} if known else {"note": "pixel size unknown: level-0 pixel units; "
                                 "set one with semdask convert --pixel-size UM"})})
    return names, coords


def _wrap(x: da.Array, attrs: dict[str, Any], level: int, *, name: str, path: Path,
          group: str, channels: list[str] | None = None,
          extra: dict[str, Any] | None = None) -> xr.DataArray:
    dims, coords = _coords(x, attrs, level, channels=channels)
    sem = attrs.get("semdask") or {}
    px = ome.pixel_size_of(attrs)
    meta = {"source": str(path), "group": group or "/", "level": int(level),
            "pixel_size_um": px if px is None else px * 2.0**level,
            **(extra or {}), "semdask": dict(sem)}
    return xr.DataArray(x, dims=dims, coords=coords, name=name, attrs=meta)


def _labels_da(lab: Labels, level: int) -> xr.DataArray:
    x = lab.data if level == 0 else lab.level(level)
    n = len(lab.classes)
    extra = {"classes": list(lab.classes), "colours": [list(c) for c in lab.colours],
             "flag_values": np.arange(n, dtype=np.uint8),
             "flag_meanings": " ".join(c.replace(" ", "_") for c in lab.classes),
             "ignored_values": "values >= len(classes) (e.g. 255) are unlabelled"}
    return _wrap(x, lab.attrs, level, name=lab.name, path=lab.path,
                 group=f"labels/{lab.name}", extra=extra)


def _mosaic_da(m: Mosaic, level: int) -> xr.DataArray:
    x = m.image if level == 0 else m.level(level)
    return _wrap(x, m.attrs, level, name="image", path=m.path, group="")


def to_dataarray(obj: Mosaic | Labels, level: int = 0) -> xr.DataArray:
    """A :class:`Mosaic` or :class:`Labels` (from :mod:`semdask.storage.io`) as a DataArray.

    Parameters
    ----------
    obj : Mosaic or Labels
        What :func:`semdask.open_mosaic` or :func:`semdask.open_labels` returned.
    level : int
        Pyramid level (0 = full resolution).
    """
    if isinstance(obj, Labels):
        return _labels_da(obj, level)
    if isinstance(obj, Mosaic):
        return _mosaic_da(obj, level)
    raise InputError("obj", expected="a semdask Mosaic or Labels",
                     got=type(obj).__name__, fix="open it with semdask.open_mosaic(path)")


def open_dataarray(path: PathLike, group: str = "", level: int = 0) -> xr.DataArray:
    """Open one group of a semdask store as a dask-backed, µm-calibrated DataArray.

    Parameters
    ----------
    path : path
        An OME-Zarr 0.5 mosaic store.
    group : str
        ``""`` or ``"image"``: the mosaic; ``"labels/<name>"`` (e.g. ``"labels/phases"``):
        a label image (uint8 class ids); any other name: a sibling image group
        (``"probs"`` -> dims ``("c", "y", "x")`` with class names on ``c``,
        ``"confidence"``, ``"uncertainty"``, ...).
    level : int
        Pyramid level (0 = full resolution).

    Returns
    -------
    xarray.DataArray
        Lazy (dask) data with the store's chunks; coordinates are pixel centres in µm
        (``units`` attribute; ``"pixel"`` when the pixel size is unknown).

    Raises
    ------
    StoreError
        When the store or group does not exist.
    IncompleteOutputError
        When the group was not completely written.
    InputError
        When ``level`` is not one of the group's pyramid levels.
    """
    g = group.strip("/")
    if g in ("", "image"):
        return _mosaic_da(open_mosaic(path), level)
    if g.startswith("labels/"):
        return _labels_da(open_labels(path, g.split("/", 1)[1]), level)
    p = validate_input_path(path, kind="dir")
    x = open_extra_image(p, g, level)  # refuses incomplete groups, checks the ledger
    attrs = read_attrs(p, g)
    channels = (attrs.get("semdask") or {}).get("channels")
    while x.ndim > 3 or (x.ndim == 3 and channels is None and x.shape[0] == 1):
        x = x[0]
    return _wrap(x, attrs, level, name=g, path=p, group=g,
                 channels=None if channels is None else [str(c) for c in channels])
