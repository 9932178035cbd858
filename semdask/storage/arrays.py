"""Zarr primitives of the OME-Zarr stores: attributes, completeness, sharded arrays.

Groups carry ``attrs["semdask"]["complete"]``: False from creation until every block and
pyramid level is written (:func:`finish_group`), so readers refuse interrupted outputs
(:func:`check_complete`). Arrays are sharded blosc-zstd (:func:`create_array`) and written
only in shard-aligned blocks (:func:`store_blocks`); :mod:`semdask.storage.io` builds the
image, label and sibling groups on these.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import zarr
import zarr.codecs
from dask.delayed import Delayed

from semdask import config
from semdask.errors import IncompleteOutputError, InputError, StoreError
from semdask.paths import is_store
from semdask.storage import ome, pyramid
from semdask.storage.layout import inner_chunk

__all__ = [
    "align_to",
    "as_array",
    "as_dask",
    "begin_pyramid",
    "build_pyramid",
    "check_complete",
    "create_array",
    "finish_group",
    "group_attrs",
    "open_group",
    "read_attrs",
    "set_complete",
    "shard_grid",
    "store_blocks",
    "update_attrs",
]

PathLike = str | Path
_RERUN = "re-run the command; the previous run was interrupted"

# ------------------------------------------------------------------ attributes


def open_group(path: PathLike, group: str = "", mode: Literal["r", "r+"] = "r") -> zarr.Group:
    """Open ``group`` (the root by default) of the Zarr store at ``path``."""
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


def group_attrs(g: zarr.Group) -> dict[str, Any]:
    """A plain-dict copy of a group's attributes."""
    return dict(g.attrs.asdict())


def read_attrs(path: PathLike, group: str = "") -> dict[str, Any]:
    """All attributes of ``group`` (root by default) of the store at ``path``."""
    return group_attrs(open_group(path, group))


def update_attrs(path: PathLike, group: str, values: dict[str, Any],
                 *, key: str | None = "semdask") -> None:
    """Merge ``values`` into ``attrs[key]`` (or into the top level when ``key`` is None)."""
    g = open_group(path, group, mode="r+")
    vals = ome.jsonable(values)
    if key is None:
        g.attrs.update(vals)
    else:
        g.attrs[key] = {**(group_attrs(g).get(key) or {}), **vals}


def set_complete(path: PathLike, group: str = "", complete: bool = True) -> None:
    """Mark ``group`` finished (or unfinished) in ``attrs["semdask"]["complete"]``."""
    update_attrs(path, group, {"complete": bool(complete)})


def check_complete(attrs: dict[str, Any], what: str) -> None:
    """Refuse a group whose ``attrs["semdask"]["complete"]`` is False (an interrupted write)."""
    if (attrs.get("semdask") or {}).get("complete") is False:
        raise IncompleteOutputError(what, expected="a completely written output",
                                    got="a store marked incomplete", fix=_RERUN)


# ------------------------------------------------------------------ arrays


def create_array(group: zarr.Group, name: str, *, shape: Sequence[int], dtype: Any,
                 shard: tuple[int, ...], dimension_names: tuple[str, ...],
                 fill_value: Any = 0) -> zarr.Array:
    """Create a sharded blosc-zstd array; inner chunk = ``layout.inner_chunk(shard edge)``."""
    max_inner = int(config.get("store.inner-chunk", 512))
    inner = tuple(inner_chunk(int(s), max_inner=max_inner) for s in shard)
    level = int(config.get("store.compressor-level", 5))
    codec = zarr.codecs.BloscCodec(cname="zstd", clevel=level, shuffle="shuffle")
    return group.create_array(name, shape=tuple(shape), dtype=dtype, chunks=inner,
                              shards=tuple(shard), compressors=codec, fill_value=fill_value,
                              dimension_names=dimension_names)


def shard_grid(arr: zarr.Array) -> tuple[int, ...]:
    """The write grid of ``arr``: its shard shape, else its chunk shape."""
    return tuple(arr.shards or arr.chunks)


def align_to(x: da.Array, target: zarr.Array) -> da.Array:
    """Rechunk ``x`` onto the shard grid (chunk grid when unsharded) of ``target``."""
    grid = shard_grid(target)
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
        bad = ome.misaligned(src.chunks, shard_grid(tgt))
        if bad is not None:
            raise StoreError(
                f"dask chunks of the array written to {tgt.path}",
                expected=f"chunk boundaries on multiples of the shard {shard_grid(tgt)}",
                got=f"a boundary at {bad[1]} on axis {bad[0]}",
                fix=f"rechunk first: x.rechunk({shard_grid(tgt)}) or "
                "semdask.storage.arrays.align_to(x, target)")
    stored = da.store(list(sources), list(targets), lock=False,  # type: ignore[arg-type]
                      compute=compute)
    if compute:
        return None
    from dask.graph_manipulation import checkpoint

    # dask returns empty "store-map" arrays here; one Delayed is easier to hand around
    return checkpoint(*(stored if isinstance(stored, tuple | list) else [stored]))


def as_dask(arr: Any) -> da.Array:
    """A zarr array as a dask array chunked on its write grid."""
    return da.from_zarr(arr, chunks=shard_grid(arr))


def as_array(x: Any, ndims: tuple[int, ...], what: str) -> da.Array:
    """``x`` as a dask array with one of ``ndims`` dimensions (InputError otherwise)."""
    x = x if isinstance(x, da.Array) else da.asarray(np.asarray(x))
    if x.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise InputError(what, expected=f"a {want} array", got=f"shape {x.shape}")
    return x


def begin_pyramid(parent: zarr.Group, name: str, attrs: dict[str, Any], *, shape: Sequence[int],
           dtype: Any, shard: tuple[int, ...], names: str) -> zarr.Array:
    """Create group ``name`` (marked incomplete) and every pyramid level array; return level 0."""
    g = parent.create_group(name, attributes=attrs) if name else parent
    n = len(ome.multiscales_of(attrs)[0]["datasets"])
    arrays = [create_array(g, str(i), shape=s, dtype=dtype, shard=shard,
                           dimension_names=tuple(names))
              for i, s in enumerate(pyramid.level_shapes(shape, n))]
    return arrays[0]


def build_pyramid(path: PathLike, group: str = "") -> list[zarr.Array]:
    """Fill levels 1.. of ``group`` from level 0 (labels: mode, else mean); flag untouched."""
    g = open_group(path, group, mode="r+")
    ms = ome.multiscales_of(group_attrs(g))[0]
    arrays: list[Any] = [g[d["path"]] for d in ms["datasets"]]
    down = pyramid.downsample_mode if ms.get("type") == "mode" else pyramid.downsample_mean
    for prev, arr in itertools.pairwise(arrays):
        store_blocks([align_to(down(as_dask(prev)), arr)], [arr])
    return arrays


def finish_group(path: PathLike, group: str = "") -> None:
    """Fill pyramid levels 1.. from level 0 (mode for labels, else mean); mark complete."""
    build_pyramid(path, group)
    set_complete(path, group)
