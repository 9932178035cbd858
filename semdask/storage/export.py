"""Export to OME-NGFF 0.4 (Zarr v2) for Fiji, QuPath and older napari."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import zarr

from semdask import config
from semdask.errors import StoreError
from semdask.paths import validate_output_path
from semdask.storage import ome
from semdask.storage.io import (
    align_to,
    open_labels,
    open_mosaic,
    read_attrs,
    set_complete,
    store_blocks,
)

__all__ = ["export_ngff04"]

PathLike = str | Path


def _copy_v2(g: zarr.Group, levels: list[da.Array], chunk: int) -> None:
    import numcodecs

    level = int(config.get("store.compressor-level", 5))
    comp = numcodecs.Blosc(cname="zstd", clevel=level, shuffle=numcodecs.Blosc.SHUFFLE)
    for i, x in enumerate(levels):
        arr = g.create_array(str(i), shape=x.shape, dtype=x.dtype, chunks=(chunk,) * x.ndim,
                             compressors=comp, fill_value=0,
                             chunk_key_encoding={"name": "v2", "separator": "/"})
        store_blocks([align_to(x, arr)], [arr])


def export_ngff04(src: PathLike, dst: PathLike, *, overwrite: bool = False,
                  chunk: int = 1024) -> Path:
    """Copy the image pyramid and labels of ``src`` to a Zarr v2 / OME-NGFF 0.4 store.

    For Fiji (MoBIE/n5-viewer), QuPath and older napari; unsharded ``chunk``-edge chunks.
    """
    m = open_mosaic(src)
    p = validate_output_path(dst, overwrite=overwrite, input_path=m.path)
    sem = {**(m.attrs.get("semdask") or {}), "exported_from": str(m.path), "complete": False}
    root = zarr.create_group(store=str(p), zarr_format=2, attributes={
        **ome.image_attrs(m.levels, pixel_size_um=m.pixel_size_um, name=m.path.name,
                          version="0.4"), "semdask": sem})
    _copy_v2(root, [m.level(i) for i in range(m.levels)], chunk)
    try:
        names = (read_attrs(m.path, "labels").get("ome") or {}).get("labels", [])
    except StoreError:
        names = []
    if names:
        lg = root.create_group("labels", attributes=ome.labels_attrs(names, version="0.4"))
        for name in names:
            lab = open_labels(m.path, name)
            g = lg.create_group(name, attributes=ome.image_label_attrs(
                lab.levels, classes=lab.classes, colours=lab.colours,
                pixel_size_um=m.pixel_size_um, name=name, version="0.4"))
            _copy_v2(g, [lab.level(i) for i in range(lab.levels)], chunk)
    set_complete(p)
    return p
