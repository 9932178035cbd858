"""OME-Zarr 0.5 stores: the only module that opens files and stores.

Writes create every array first (sharded, blosc-zstd) and then store shard-aligned
dask blocks with :func:`store_blocks`; a group is marked incomplete
(``attrs["semdask"]["complete"] = False``) until its data are written, and readers
refuse incomplete outputs. Pyramid levels are 2x mean (images) or 2x mode (labels)
downsamplings built by :mod:`semdask.ome`.

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

import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import zarr
import zarr.codecs
from dask.delayed import Delayed

from semdask import config
from semdask.errors import IncompleteOutputError, InputError, StoreError, UnsafePathError
from semdask.inference.windows import inner_chunk
from semdask.paths import is_store, validate_input_path, validate_output_path
from semdask.storage import ome, pyramid

__all__ = [
    "Labels",
    "Mosaic",
    "align_to",
    "begin_extra_image",
    "begin_labels",
    "create_array",
    "finish_group",
    "open_array",
    "open_extra_image",
    "open_labels",
    "open_mosaic",
    "read_attrs",
    "set_complete",
    "store_blocks",
    "update_attrs",
    "validate_input_path",
    "validate_output_path",
    "write_extra_image",
    "write_image",
    "write_labels",
    "write_synthetic",
]

log = logging.getLogger(__name__)
PathLike = str | Path
_RERUN = "re-run the command; the previous run was interrupted"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------ attributes


def _group(path: PathLike, group: str = "", mode: Literal["r", "r+"] = "r") -> zarr.Group:
    p = Path(path)
    if not is_store(p):
        raise StoreError(f"{p}", expected="a Zarr store", got="no zarr.json there")
    try:
        root = zarr.open_group(store=str(p), mode=mode)
        g = root[group] if group else root
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise StoreError(f"group {group!r} in {p}", expected="an existing group",
                         got="nothing there") from e
    if not isinstance(g, zarr.Group):
        raise StoreError(f"{group!r} in {p}", expected="a group", got="an array")
    return g


def _attrs(g: zarr.Group) -> dict[str, Any]:
    return dict(g.attrs.asdict())


def read_attrs(path: PathLike, group: str = "") -> dict[str, Any]:
    """All attributes of ``group`` (root by default) of the store at ``path``."""
    return _attrs(_group(path, group))


def update_attrs(path: PathLike, group: str, values: dict[str, Any],
                 *, key: str | None = "semdask") -> None:
    """Merge ``values`` into ``attrs[key]`` (or into the top level when ``key`` is None)."""
    g = _group(path, group, mode="r+")
    vals = ome.jsonable(values)
    if key is None:
        g.attrs.update(vals)
    else:
        g.attrs[key] = {**(_attrs(g).get(key) or {}), **vals}


def set_complete(path: PathLike, group: str = "", complete: bool = True) -> None:
    """Mark ``group`` finished (or unfinished) in ``attrs["semdask"]["complete"]``."""
    update_attrs(path, group, {"complete": bool(complete)})


def _check_complete(attrs: dict[str, Any], what: str) -> None:
    if (attrs.get("semdask") or {}).get("complete") is False:
        raise IncompleteOutputError(what, expected="a completely written output",
                                    got="a store marked incomplete", fix=_RERUN)


# ------------------------------------------------------------------ arrays


def create_array(group: zarr.Group, name: str, *, shape: Sequence[int], dtype: Any,
                 shard: tuple[int, ...], dimension_names: tuple[str, ...],
                 fill_value: Any = 0) -> zarr.Array:
    """Create a sharded blosc-zstd array; inner chunk = ``tiling.inner_chunk(shard edge)``."""
    max_inner = int(config.get("store.inner-chunk", 512))
    inner = tuple(inner_chunk(int(s), max_inner=max_inner) for s in shard)
    level = int(config.get("store.compressor-level", 5))
    codec = zarr.codecs.BloscCodec(cname="zstd", clevel=level, shuffle="shuffle")
    return group.create_array(name, shape=tuple(shape), dtype=dtype, chunks=inner,
                              shards=tuple(shard), compressors=codec, fill_value=fill_value,
                              dimension_names=dimension_names)


def _grid(arr: zarr.Array) -> tuple[int, ...]:
    return tuple(arr.shards or arr.chunks)


def align_to(x: da.Array, target: zarr.Array) -> da.Array:
    """Rechunk ``x`` onto the shard grid (chunk grid when unsharded) of ``target``."""
    grid = _grid(target)
    return x if ome.misaligned(x.chunks, grid) is None else x.rechunk(grid)


def store_blocks(sources: Sequence[da.Array], targets: Sequence[zarr.Array], *,
                 compute: bool = True) -> Delayed | None:
    """Store dask arrays into zarr arrays in one graph (shared upstream computation).

    Every dask chunk boundary must be a shard boundary, otherwise two tasks would
    write the same shard and silently lose data. With ``compute=False`` one
    ``Delayed`` is returned (compute it on a client or under a progress bar).

    Raises
    ------
    StoreError
        When shapes differ or chunks are not aligned with the target's shards.
    """
    if len(sources) != len(targets):
        raise StoreError("store_blocks", expected="one target per source",
                         got=f"{len(sources)} sources and {len(targets)} targets")
    for src, tgt in zip(sources, targets, strict=True):
        if tuple(src.shape) != tuple(tgt.shape):
            raise StoreError(f"array written to {tgt.path}", expected=f"shape {tgt.shape}",
                             got=f"shape {src.shape}")
        bad = ome.misaligned(src.chunks, _grid(tgt))
        if bad is not None:
            raise StoreError(
                f"dask chunks of the array written to {tgt.path}",
                expected=f"chunk boundaries on multiples of the shard {_grid(tgt)}",
                got=f"a boundary at {bad[1]} on axis {bad[0]}",
                fix=f"rechunk first: x.rechunk({_grid(tgt)}) or semdask.io.align_to(x, target)")
    stored = da.store(list(sources), list(targets), lock=False,  # type: ignore[arg-type]
                      compute=compute)
    if compute:
        return None
    from dask.graph_manipulation import checkpoint

    # dask returns empty "store-map" arrays here; one Delayed is easier to hand around
    return checkpoint(*(stored if isinstance(stored, tuple | list) else [stored]))


def _as_dask(arr: Any) -> da.Array:
    return da.from_zarr(arr, chunks=_grid(arr))


def _as_array(x: Any, ndims: tuple[int, ...], what: str) -> da.Array:
    x = x if isinstance(x, da.Array) else da.asarray(np.asarray(x))
    if x.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise InputError(what, expected=f"a {want} array", got=f"shape {x.shape}")
    return x


def _begin(parent: zarr.Group, name: str, attrs: dict[str, Any], *, shape: Sequence[int],
           dtype: Any, shard: tuple[int, ...], names: str) -> zarr.Array:
    """Create group ``name`` (marked incomplete) and every pyramid level array; return level 0."""
    g = parent.create_group(name, attributes=attrs) if name else parent
    n = len(ome.multiscales_of(attrs)[0]["datasets"])
    arrays = [create_array(g, str(i), shape=s, dtype=dtype, shard=shard,
                           dimension_names=tuple(names))
              for i, s in enumerate(pyramid.level_shapes(shape, n))]
    return arrays[0]


def finish_group(path: PathLike, group: str = "") -> None:
    """Fill pyramid levels 1.. from level 0 (mode for labels, else mean); mark complete."""
    g = _group(path, group, mode="r+")
    ms = ome.multiscales_of(_attrs(g))[0]
    arrays: list[Any] = [g[d["path"]] for d in ms["datasets"]]
    down = pyramid.downsample_mode if ms.get("type") == "mode" else pyramid.downsample_mean
    for prev, arr in itertools.pairwise(arrays):
        store_blocks([align_to(down(_as_dask(prev)), arr)], [arr])
    set_complete(path, group)


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


def _level(path: Path, group: str, attrs: dict[str, Any], i: int) -> da.Array:
    ms = ome.multiscales_of(attrs)
    datasets = ms[0]["datasets"] if ms else []
    if not 0 <= i < len(datasets):
        raise InputError("level", expected=f"0..{len(datasets) - 1}", got=repr(i))
    sub = "/".join(s for s in (group, datasets[i]["path"]) if s)
    try:
        arr = zarr.open_array(store=str(path), path=sub, mode="r")
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise StoreError(f"{path}/{sub}", expected="a Zarr array", got="nothing there") from e
    return _as_dask(arr)


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
    _check_complete(attrs, f"mosaic {p}")
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
    ms = ome.multiscales_of(_attrs(root))
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
    x = _as_array(image, (2,), "image")
    p = validate_output_path(path, overwrite=overwrite)
    cfg = config.get("store.shard", "auto")
    chunk = chunk or (cfg if isinstance(cfg, int) else None)
    meta = {**ome.image_attrs(levels or pyramid.n_levels(x.shape), pixel_size_um=pixel_size_um,
                              name=p.name), "semdask": ome.semdask_attrs(attrs, pixel_size_um)}
    root = zarr.create_group(store=str(p), zarr_format=3)
    arr = _begin(root, "", meta, shape=x.shape, dtype=x.dtype, names="yx",
                 shard=ome.shard_shape(x.shape, "yx", chunk=chunk, chunks=x.chunks))
    root.attrs.update(meta)
    store_blocks([align_to(x, arr)], [arr])
    finish_group(p)
    return open_mosaic(p)


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
        pixel_size_um = ome.pixel_size_of(_attrs(root))
    if levels is None and _mosaic_shape(root) == tuple(shape[-2:]):
        levels = len(ome.multiscales_of(_attrs(root))[0]["datasets"])  # same pyramid
    _replace(root, name, overwrite, f"{name} in {p}")
    extra: dict[str, Any] = {} if channel_names is None else {"channels": list(channel_names)}
    meta = {**ome.image_attrs(levels or pyramid.n_levels(shape), pixel_size_um=pixel_size_um,
                              names=names, name=name),
            "semdask": ome.semdask_attrs(attrs, pixel_size_um, **extra)}
    return _begin(root, name, meta, shape=shape, dtype=dtype, names=names,
                  shard=ome.shard_shape(shape, names, chunk=chunk or 1024))


def write_extra_image(path: PathLike, name: str, array: da.Array, *,
                      channel_names: Sequence[str] | None = None,
                      pixel_size_um: float | None = None, attrs: dict[str, Any] | None = None,
                      chunk: int | None = None, dtype: Any = None, overwrite: bool = False,
                      levels: int | None = None) -> None:
    """Write a sibling image group (``probs``, ``confidence``, ``eds``...) into a store.

    ``array`` is (y, x) or (c, y, x); shard edge = ``chunk`` or the dask chunk edge.
    """
    x = _as_array(array, (2, 3), name)
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
    _check_complete(attrs, f"{name} in {p}")
    return _level(p, name, attrs, level)


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
        return _level(self.path, f"labels/{self.name}", self.attrs, i)


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
    root_attrs = _attrs(root)
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
    arr = _begin(lg, name, meta, shape=shape, dtype=np.uint8, names="yx",
                 shard=ome.shard_shape(shape, "yx", chunk=chunk or 1024))
    names = [s for s in (_attrs(lg).get("ome") or {}).get("labels", []) if s != name]
    lg.attrs.update(ome.labels_attrs([*names, name]))
    return arr


def write_labels(path: PathLike, labels: da.Array, *, name: str = "phases",
                 classes: Sequence[str],
                 colours: Sequence[tuple[int, int, int, int]] | None = None,
                 attrs: dict[str, Any] | None = None, chunk: int | None = None,
                 overwrite: bool = False, levels: int | None = None) -> Labels:
    """Write ``labels/<name>`` (uint8 class ids, 2x mode pyramid) into a mosaic store."""
    x = _as_array(labels, (2,), "labels")
    x = x.astype(np.uint8) if x.dtype != np.uint8 else x
    shard = ome.shard_shape(x.shape, "yx", chunk=chunk, chunks=x.chunks)
    arr = begin_labels(path, name, shape=x.shape, classes=classes, colours=colours,
                       attrs=attrs, chunk=shard[-1], overwrite=overwrite, levels=levels)
    store_blocks([align_to(x, arr)], [arr])
    finish_group(path, f"labels/{name}")
    return open_labels(path, name)


def open_labels(path: PathLike, name: str = "phases") -> Labels:
    """Open ``labels/<name>``; IncompleteOutputError when its write did not finish."""
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
    _check_complete(attrs, f"labels/{name} in {p}")
    classes, colours = ome.label_info(attrs)
    return Labels(path=p, name=name, data=_level(p, f"labels/{name}", attrs, 0),
                  classes=classes, colours=colours, attrs=attrs)


def write_synthetic(path: PathLike, mosaic: Any, *, overwrite: bool = False,
                    client: Any = None) -> Mosaic:
    """Write a :class:`semdask.synthetic.sem.SyntheticMosaic`: image, ``labels/truth``, ``eds``.

    All three are stored in one graph, so each synthetic chunk is rendered once.
    """
    from semdask.synthetic.sem import COLOURS, PHASES

    x, px = _as_array(mosaic.image, (2,), "image"), mosaic.pixel_size_um
    p = validate_output_path(path, overwrite=overwrite)
    shard = ome.shard_shape(x.shape, "yx", chunks=x.chunks)
    meta = {**ome.image_attrs(pyramid.n_levels(x.shape), pixel_size_um=px, name=p.name),
            "semdask": ome.semdask_attrs({"synthetic": {**mosaic.params.as_dict(),
                                                        "seed": mosaic.seed}}, px)}
    img_t = _begin(zarr.create_group(store=str(p), zarr_format=3, attributes=meta), "", meta,
                   shape=x.shape, dtype=x.dtype, shard=shard, names="yx")
    lab_t = begin_labels(p, "truth", shape=x.shape, classes=PHASES, colours=COLOURS,
                         chunk=shard[-1])
    eds = _as_array(mosaic.eds, (3,), "eds")
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
