"""OME-Zarr 0.5 stores: the only module that opens files and stores.

Writes create every array first (sharded, blosc-zstd) and then store shard-aligned
dask blocks with :func:`store_blocks`; a group is marked incomplete
(``attrs["semdask"]["complete"] = False``) until its data are written, and readers
refuse incomplete outputs, and damaged outputs of ``semdask segment`` (every block read
is checked against its ledger: :mod:`semdask.storage.integrity`). Pyramid levels are 2x
mean (images) or 2x mode (labels) downsamplings built by :mod:`semdask.storage.ome`.

Examples
--------
>>> import tempfile, numpy as np, dask.array as da
>>> d = tempfile.mkdtemp()
>>> img = da.from_array(np.arange(600 * 700, dtype=np.uint16).reshape(600, 700), chunks=256)
>>> m = write_image(f"{d}/m.ome.zarr", img, pixel_size_um=0.1)
>>> m.levels, m.level(1).shape, m.image.chunksize
(2, (300, 350), (256, 256))
>>> lab = write_labels(m.path, (img % 3).astype("u1"), classes=["a", "b", "c"])
>>> lab.classes, bool((lab.data.compute() == img.compute() % 3).all())
(['a', 'b', 'c'], True)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import zarr
import zarr.codecs

from semdask import config
from semdask.errors import InputError, StoreError, UnsafePathError
from semdask.paths import is_store, validate_input_path, validate_output_path
from semdask.storage import integrity, ome, pyramid
from semdask.storage.arrays import (
    align_to,
    as_array,
    as_dask,
    begin_pyramid,
    check_complete,
    finish_group,
    group_attrs,
    read_attrs,
    store_blocks,
)

__all__ = [
    "Labels",
    "Mosaic",
    "begin_extra_image",
    "begin_image",
    "begin_labels",
    "open_array",
    "open_extra_image",
    "open_labels",
    "open_mosaic",
    "write_extra_image",
    "write_image",
    "write_labels",
    "write_synthetic",
]

log = logging.getLogger(__name__)
PathLike = str | Path
_RERUN = "re-run the command; the previous run was interrupted"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------ images


@dataclass(frozen=True)
class Mosaic:
    """An OME-Zarr mosaic: level-0 image (y, x) plus pyramid access."""

    path: Path
    image: da.Array
    pixel_size_um: float | None
    levels: int
    attrs: dict[str, Any] = field(repr=False)

    def level(self, i: int) -> da.Array:
        """Pyramid level ``i`` (0 = full resolution), (y, x)."""
        return _squeeze(_level(self.path, "", self.attrs, i), self.path)


def _level(path: Path, group: str, attrs: dict[str, Any], i: int, *,
           checked: bool = False) -> da.Array:
    ms = ome.multiscales_of(attrs)
    datasets = ms[0]["datasets"] if ms else []
    if not 0 <= i < len(datasets):
        raise InputError("level", expected=f"0..{len(datasets) - 1}", got=repr(i))
    sub = "/".join(s for s in (group, datasets[i]["path"]) if s)
    try:
        arr = zarr.open_array(store=str(path), path=sub, mode="r")
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise StoreError(f"{path}/{sub}", expected="a Zarr array", got="nothing there") from e
    x = integrity.checked_level(arr, path, group, i) if checked else None  # None: no ledger
    return as_dask(arr) if x is None else x


def _squeeze(x: da.Array, path: Path) -> da.Array:
    while x.ndim > 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2:
        raise StoreError(f"image in {path}", expected="a 2-D (y, x) image",
                         got=f"shape {x.shape}", fix="extract one plane before converting")
    return x


def open_mosaic(path: PathLike) -> Mosaic:
    """Open an OME-Zarr (0.5) mosaic.

    Raises
    ------
    UnsafePathError
        When the path does not exist.
    StoreError
        When it is a TIFF or anything else that is not an OME-Zarr image.
    IncompleteOutputError
        When the store was not completely written.
    """
    p = validate_input_path(path)
    convert = f"convert it first: semdask convert {p} {p.with_suffix('')}.ome.zarr"
    if p.is_file():
        kind = "a TIFF file" if p.suffix.lower() in (".tif", ".tiff") else "a file"
        raise StoreError(f"{p}", expected="an OME-Zarr store (a directory)", got=kind,
                         fix=convert)
    if not (p / "zarr.json").is_file():
        got = "a Zarr v2 / OME-Zarr 0.4 store" if is_store(p) else "a directory, no zarr.json"
        raise StoreError(f"{p}", expected="an OME-Zarr 0.5 store", got=got, fix=convert)
    attrs = read_attrs(p)
    ms = ome.multiscales_of(attrs)
    if not ms:
        raise StoreError(f"{p}", expected="an OME-Zarr image (multiscales metadata)",
                         got="a Zarr group without multiscales", fix=convert)
    check_complete(attrs, f"mosaic {p}")
    return Mosaic(path=p, image=_squeeze(_level(p, "", attrs, 0), p),
                  pixel_size_um=ome.pixel_size_of(attrs), levels=len(ms[0]["datasets"]),
                  attrs=attrs)


def _root_for_write(path: PathLike) -> tuple[Path, zarr.Group]:
    p = Path(path).expanduser().resolve()
    if not p.exists():
        validate_output_path(p, overwrite=False)
        sem = ome.semdask_attrs(None, None, complete=True)
        return p, zarr.create_group(store=str(p), zarr_format=3, attributes={"semdask": sem})
    if not (p / "zarr.json").is_file():
        raise StoreError(f"{p}", expected="an OME-Zarr 0.5 store to add to",
                         got="something else", fix="write the image first (write_image)")
    return p, zarr.open_group(store=str(p), mode="r+")


def _mosaic_shape(root: zarr.Group) -> tuple[int, ...] | None:
    ms = ome.multiscales_of(group_attrs(root))
    if not ms:
        return None
    return tuple(root[ms[0]["datasets"][0]["path"]].shape)[-2:]  # type: ignore[union-attr]


def _replace(parent: zarr.Group, name: str, overwrite: bool, what: str) -> None:
    if name in parent:
        if not overwrite:
            raise UnsafePathError(what, expected="a new output", got="an existing one",
                                  fix="pass overwrite=True (--overwrite) to replace it")
        del parent[name]


def write_image(path: PathLike, image: da.Array, *, pixel_size_um: float | None,
                chunk: int | None = None, levels: int | None = None,
                attrs: dict[str, Any] | None = None, overwrite: bool = False) -> Mosaic:
    """Write a (y, x) mosaic and its 2x mean pyramid as a new OME-Zarr 0.5 store.

    Shard edge = ``chunk`` (else config ``store.shard``, else the dask chunk edge);
    levels until the smaller side is at most 512 px unless ``levels`` is given.
    """
    return begin_image(path, image, pixel_size_um=pixel_size_um, chunk=chunk, levels=levels,
                       attrs=attrs, overwrite=overwrite)()


def begin_image(path: PathLike, image: da.Array, *, pixel_size_um: float | None,
                chunk: int | None = None, levels: int | None = None,
                attrs: dict[str, Any] | None = None,
                overwrite: bool = False) -> Callable[[], Mosaic]:
    """Create the store of :func:`write_image` (metadata and every level, incomplete).

    Returns the call that writes the pixels and the pyramid, marks the store complete
    and opens it. In between, other groups (labels) can be created in the store, and
    the pixels can be written while other work runs (``segment --output``).
    """
    x = as_array(image, (2,), "image")
    p = validate_output_path(path, overwrite=overwrite)
    cfg = config.get("store.shard", "auto")
    chunk = chunk or (cfg if isinstance(cfg, int) else None)
    meta = {**ome.image_attrs(levels or pyramid.n_levels(x.shape), pixel_size_um=pixel_size_um,
                              name=p.name), "semdask": ome.semdask_attrs(attrs, pixel_size_um)}
    root = zarr.create_group(store=str(p), zarr_format=3)
    arr = begin_pyramid(root, "", meta, shape=x.shape, dtype=x.dtype, names="yx",
                 shard=ome.shard_shape(x.shape, "yx", chunk=chunk, chunks=x.chunks))
    root.attrs.update(meta)

    def fill() -> Mosaic:
        store_blocks([align_to(x, arr)], [arr])
        finish_group(p)
        return open_mosaic(p)

    return fill


def begin_extra_image(path: PathLike, name: str, *, shape: Sequence[int], dtype: Any,
                      channel_names: Sequence[str] | None = None,
                      pixel_size_um: float | None = None, attrs: dict[str, Any] | None = None,
                      chunk: int | None = None, overwrite: bool = False,
                      levels: int | None = None) -> zarr.Array:
    """Create sibling image group ``name`` ((y, x) or (c, y, x)), marked incomplete.

    Returns the level-0 array: fill it with :func:`store_blocks`, then call
    :func:`finish_group`. ``chunk`` (default 1024) is the y/x shard edge; the pixel
    size defaults to the mosaic's, the level count too when the y/x shape is the mosaic's.
    """
    if not _NAME.match(name) or name == "labels" or name.isdigit():
        raise InputError("name", expected="a group name like 'probs' (not 'labels' or a number)",
                         got=repr(name))
    if len(shape) not in (2, 3):
        raise InputError(name, expected="a (y, x) or (c, y, x) shape", got=repr(tuple(shape)))
    names = "yx" if len(shape) == 2 else "cyx"
    if channel_names is not None and (len(shape) != 3 or len(channel_names) != shape[0]):
        raise InputError("channel_names", expected=f"one name per channel of {tuple(shape)}",
                         got=repr(list(channel_names)))
    p, root = _root_for_write(path)
    if pixel_size_um is None:
        pixel_size_um = ome.pixel_size_of(group_attrs(root))
    if levels is None and _mosaic_shape(root) == tuple(shape[-2:]):
        levels = len(ome.multiscales_of(group_attrs(root))[0]["datasets"])  # same pyramid
    _replace(root, name, overwrite, f"{name} in {p}")
    extra: dict[str, Any] = {} if channel_names is None else {"channels": list(channel_names)}
    meta = {**ome.image_attrs(levels or pyramid.n_levels(shape), pixel_size_um=pixel_size_um,
                              names=names, name=name),
            "semdask": ome.semdask_attrs(attrs, pixel_size_um, **extra)}
    return begin_pyramid(root, name, meta, shape=shape, dtype=dtype, names=names,
                  shard=ome.shard_shape(shape, names, chunk=chunk or 1024))


def write_extra_image(path: PathLike, name: str, array: da.Array, *,
                      channel_names: Sequence[str] | None = None,
                      pixel_size_um: float | None = None, attrs: dict[str, Any] | None = None,
                      chunk: int | None = None, dtype: Any = None, overwrite: bool = False,
                      levels: int | None = None) -> None:
    """Write a sibling image group (``probs``, ``confidence``, ``eds``...) into a store.

    ``array`` is (y, x) or (c, y, x); shard edge = ``chunk`` or the dask chunk edge.
    """
    x = as_array(array, (2, 3), name)
    x = x.astype(dtype) if dtype is not None else x
    names = "yx" if x.ndim == 2 else "cyx"
    shard = ome.shard_shape(x.shape, names, chunk=chunk, chunks=x.chunks)
    arr = begin_extra_image(path, name, shape=x.shape, dtype=x.dtype,
                            channel_names=channel_names, pixel_size_um=pixel_size_um,
                            attrs=attrs, chunk=shard[-1], overwrite=overwrite, levels=levels)
    store_blocks([align_to(x, arr)], [arr])
    finish_group(path, name)


def open_array(path: PathLike, group: str, level: int = 0, *,
               mode: Literal["r", "r+"] = "r") -> zarr.Array:
    """Level ``level`` of ``group`` as a zarr array, complete or not (ledger, resume, verify)."""
    sub = "/".join(s for s in (group, str(level)) if s)
    try:
        return zarr.open_array(store=str(Path(path)), path=sub, mode=mode)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise StoreError(f"{path}/{sub}", expected="a Zarr array", got="nothing there") from e


def open_extra_image(path: PathLike, name: str, level: int = 0) -> da.Array:
    """Level ``level`` of a sibling image group; IncompleteOutputError when unfinished."""
    p = validate_input_path(path, kind="dir")
    try:
        attrs = read_attrs(p, name)
    except StoreError as e:
        raise StoreError(f"{name} in {p}", expected="an image group", got="nothing there",
                         fix="write it first (e.g. semdask segment --probs)") from e
    check_complete(attrs, f"{name} in {p}")
    return _level(p, name, attrs, level, checked=True)


# ------------------------------------------------------------------ labels


@dataclass(frozen=True)
class Labels:
    """A label image: uint8 class ids (y, x) with class names and RGBA colours."""

    path: Path
    name: str
    data: da.Array
    classes: list[str]
    colours: list[tuple[int, int, int, int]]
    attrs: dict[str, Any] = field(repr=False)

    @property
    def levels(self) -> int:
        """Number of pyramid levels."""
        return len(ome.multiscales_of(self.attrs)[0]["datasets"])

    def level(self, i: int) -> da.Array:
        """Pyramid level ``i`` of the labels (mode-downsampled)."""
        return _level(self.path, f"labels/{self.name}", self.attrs, i, checked=True)


def begin_labels(path: PathLike, name: str = "phases", *, shape: Sequence[int],
                 classes: Sequence[str],
                 colours: Sequence[tuple[int, int, int, int]] | None = None,
                 attrs: dict[str, Any] | None = None, chunk: int | None = None,
                 overwrite: bool = False, levels: int | None = None) -> zarr.Array:
    """Create ``labels/<name>`` (uint8, marked incomplete) and return its level-0 array.

    Fill it with :func:`store_blocks`, then call ``finish_group(path, "labels/<name>")``.
    The level count matches the mosaic's (OME requires it) unless given.
    """
    if not _NAME.match(name):
        raise InputError("name", expected="a label name like 'phases'", got=repr(name))
    if not 0 < len(classes) <= 256:
        raise InputError("classes", expected="1 to 256 class names", got=str(len(classes)))
    if colours is not None and len(colours) != len(classes):
        raise InputError("colours", expected=f"{len(classes)} RGBA tuples", got=str(len(colours)))
    p, root = _root_for_write(path)
    root_attrs = group_attrs(root)
    ms = ome.multiscales_of(root_attrs)
    if ms:
        if _mosaic_shape(root) != tuple(shape):
            raise InputError("labels", expected=f"the mosaic shape {_mosaic_shape(root)}",
                             got=f"shape {tuple(shape)}")
        levels = levels or len(ms[0]["datasets"])
    cols = [tuple(int(v) for v in c) for c in (colours or ome.default_colours(len(classes)))]
    lg = root.get("labels")
    if not isinstance(lg, zarr.Group):
        lg = root.create_group("labels", attributes=ome.labels_attrs([]))
    _replace(lg, name, overwrite, f"labels/{name} in {p}")
    px = ome.pixel_size_of(root_attrs)
    meta = {**ome.image_label_attrs(levels or pyramid.n_levels(shape), classes=classes,
                                    colours=cols, pixel_size_um=px, name=name),
            "semdask": ome.semdask_attrs(attrs, px, classes=list(classes), colours=cols)}
    arr = begin_pyramid(lg, name, meta, shape=shape, dtype=np.uint8, names="yx",
                 shard=ome.shard_shape(shape, "yx", chunk=chunk or 1024))
    names = [s for s in (group_attrs(lg).get("ome") or {}).get("labels", []) if s != name]
    lg.attrs.update(ome.labels_attrs([*names, name]))
    return arr


def write_labels(path: PathLike, labels: da.Array, *, name: str = "phases",
                 classes: Sequence[str],
                 colours: Sequence[tuple[int, int, int, int]] | None = None,
                 attrs: dict[str, Any] | None = None, chunk: int | None = None,
                 overwrite: bool = False, levels: int | None = None) -> Labels:
    """Write ``labels/<name>`` (uint8 class ids, 2x mode pyramid) into a mosaic store."""
    x = as_array(labels, (2,), "labels")
    x = x.astype(np.uint8) if x.dtype != np.uint8 else x
    shard = ome.shard_shape(x.shape, "yx", chunk=chunk, chunks=x.chunks)
    arr = begin_labels(path, name, shape=x.shape, classes=classes, colours=colours,
                       attrs=attrs, chunk=shard[-1], overwrite=overwrite, levels=levels)
    store_blocks([align_to(x, arr)], [arr])
    finish_group(path, f"labels/{name}")
    return open_labels(path, name)


def open_labels(path: PathLike, name: str = "phases") -> Labels:
    """Open ``labels/<name>``: IncompleteOutputError when unfinished; DamagedOutputError
    (now, or from a damaged block's task) when it no longer matches its ledger."""
    p = validate_input_path(path, kind="dir")
    try:
        attrs = read_attrs(p, f"labels/{name}")
    except StoreError as e:
        try:
            have = (read_attrs(p, "labels").get("ome") or {}).get("labels", [])
        except StoreError:
            have = []
        raise StoreError(f"labels {name!r} in {p}", expected="an existing label image",
                         got=f"labels {have}" if have else "no labels",
                         fix="run semdask segment (or label) on this store first") from e
    check_complete(attrs, f"labels/{name} in {p}")
    classes, colours = ome.label_info(attrs)
    return Labels(path=p, name=name, data=_level(p, f"labels/{name}", attrs, 0, checked=True),
                  classes=classes, colours=colours, attrs=attrs)


def write_synthetic(path: PathLike, mosaic: Any, *, overwrite: bool = False,
                    client: Any = None) -> Mosaic:
    """Write a :class:`semdask.synthetic.sem.SyntheticMosaic`: image, ``labels/truth``, ``eds``.

    All three are stored in one graph, so each synthetic chunk is rendered once. The class
    names and colours of ``labels/truth`` come from ``mosaic.classes`` / ``mosaic.colours``.
    """
    x, px = as_array(mosaic.image, (2,), "image"), mosaic.pixel_size_um
    p = validate_output_path(path, overwrite=overwrite)
    shard = ome.shard_shape(x.shape, "yx", chunks=x.chunks)
    meta = {**ome.image_attrs(pyramid.n_levels(x.shape), pixel_size_um=px, name=p.name),
            "semdask": ome.semdask_attrs({"synthetic": {**mosaic.params.as_dict(),
                                                        "seed": mosaic.seed}}, px)}
    img_t = begin_pyramid(zarr.create_group(store=str(p), zarr_format=3, attributes=meta), "", meta,
                   shape=x.shape, dtype=x.dtype, shard=shard, names="yx")
    lab_t = begin_labels(p, "truth", shape=x.shape, classes=mosaic.classes, colours=mosaic.colours,
                         chunk=shard[-1])
    eds = as_array(mosaic.eds, (3,), "eds")
    eds_t = begin_extra_image(p, "eds", shape=eds.shape, dtype=eds.dtype, pixel_size_um=px * 4,
                              channel_names=("Ni", "O", "Zr"),
                              attrs={"true_shift_px": list(mosaic.eds_shift_px)},
                              chunk=ome.shard_shape(eds.shape, "cyx", chunks=eds.chunks)[-1])
    job = store_blocks([align_to(x, img_t), align_to(mosaic.truth, lab_t), align_to(eds, eds_t)],
                       [img_t, lab_t, eds_t], compute=False)
    if client is not None:
        client.compute(job).result()
    else:
        job.compute()  # type: ignore[union-attr]
    for g in ("labels/truth", "eds", ""):
        finish_group(p, g)
    return open_mosaic(p)
