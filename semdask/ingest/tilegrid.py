"""Tile grids: fuse SEM tiles placed at pixel offsets into one lazy mosaic (feathering).

Each tile's weight is the product of its distances (+0.5 px) to its own edges along y
and x, so across an overlap between two tiles the weights ramp linearly and the seam
becomes a linear ramp. :class:`TileGrid` is array-like: ``dask.array.from_array`` reads
each output chunk from just the tile regions overlapping it (:mod:`semdask.ingest.convert`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from semdask.errors import InputError, UnsafePathError
from semdask.ingest.readers import ImageFile

__all__ = ["TileGrid", "read_tile_offsets"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def _ramp(n: int, start: int, stop: int) -> np.ndarray:
    i = np.arange(start, stop, dtype=np.float64)
    return np.minimum(i + 0.5, n - i - 0.5)


class TileGrid:
    """A lazy, array-like fusion of tiles at pixel offsets (for :func:`dask.array.from_array`).

    Parameters
    ----------
    tiles : sequence of ImageFile
        Tiles of one dtype.
    offsets : sequence of (int, int)
        ``(y, x)`` of each tile's top-left pixel; shifted so the smallest is 0.
    """

    def __init__(self, tiles: Sequence[ImageFile], offsets: Sequence[tuple[int, int]]) -> None:
        if not tiles or len(tiles) != len(offsets):
            raise InputError("tile grid", expected="one offset per tile, at least one tile",
                             got=f"{len(tiles)} tiles, {len(offsets)} offsets")
        dtypes = {t.dtype.name for t in tiles}
        if len(dtypes) > 1:
            raise InputError("tile grid", expected="tiles of one pixel type",
                             got=", ".join(sorted(dtypes)), fix="re-export the tiles alike")
        y0, x0 = min(o[0] for o in offsets), min(o[1] for o in offsets)
        self.tiles = list(tiles)
        self.offsets = [(int(y) - y0, int(x) - x0) for y, x in offsets]
        self.shape = (
            max(y + t.shape[0] for t, (y, _) in zip(self.tiles, self.offsets, strict=True)),
            max(x + t.shape[1] for t, (_, x) in zip(self.tiles, self.offsets, strict=True)),
        )
        self.dtype = tiles[0].dtype
        self.ndim = 2

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = (range(n)[k] for k, n in zip(key, self.shape, strict=True))
        return self.read(ys.start, ys.stop, xs.start, xs.stop)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Fuse rows ``y0:y1``, columns ``x0:x1`` from the tiles overlapping them."""
        acc = np.zeros((y1 - y0, x1 - x0), np.float64)
        wsum = np.zeros_like(acc)
        for tile, (ty, tx) in zip(self.tiles, self.offsets, strict=True):
            th, tw = tile.shape
            a, b, c, d = max(y0, ty), min(y1, ty + th), max(x0, tx), min(x1, tx + tw)
            if a >= b or c >= d:
                continue
            w = np.outer(_ramp(th, a - ty, b - ty), _ramp(tw, c - tx, d - tx))
            acc[a - y0 : b - y0, c - x0 : d - x0] += w * tile.read(a - ty, b - ty, c - tx, d - tx)
            wsum[a - y0 : b - y0, c - x0 : d - x0] += w
        fused = np.divide(acc, wsum, out=np.zeros_like(acc), where=wsum > 0)
        if self.dtype.kind == "f":
            return fused.astype(self.dtype)
        info = np.iinfo(self.dtype)
        return np.clip(np.rint(fused), info.min, info.max).astype(self.dtype)


def read_tile_offsets(csv_path: PathLike) -> list[tuple[str, int, int]]:
    """Read a tile offsets CSV with a header ``file,y,x`` (pixels) -> ``[(file, y, x)]``.

    Non-integer offsets are rounded to the nearest pixel (logged).
    """
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise UnsafePathError(f"{path}", expected="an offsets CSV file",
                              got="nothing at that path", fix="check --tile-offsets")
    fix = "write a CSV with the header line 'file,y,x' and one row per tile (offsets in pixels)"
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = {c.strip().lower(): c for c in reader.fieldnames or []}
        if not {"file", "y", "x"} <= set(cols):
            raise InputError(f"{path}", expected="columns file, y, x (header required)",
                             got=f"header {reader.fieldnames}", fix=fix)
        rows: list[tuple[str, int, int]] = []
        for n, row in enumerate(reader, start=2):
            try:
                name = row[cols["file"]].strip()
                y, x = float(row[cols["y"]]), float(row[cols["x"]])
                if not (name and math.isfinite(y) and math.isfinite(x)):
                    raise ValueError("empty file name or non-finite offset")
            except (TypeError, ValueError, AttributeError) as e:
                raise InputError(f"{path} line {n}", expected="file,y,x with numeric offsets",
                                 got=repr(row), fix=fix) from e
            if y != round(y) or x != round(x):
                log.info("%s line %d: offsets (%s, %s) rounded to whole pixels", path, n, y, x)
            rows.append((name, round(y), round(x)))
    if not rows:
        raise InputError(f"{path}", expected="at least one tile row", got="none", fix=fix)
    return rows
