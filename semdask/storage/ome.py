"""OME-NGFF metadata builders (pure: no files, no stores; pyramids: :mod:`semdask.storage.pyramid`).

:mod:`semdask.storage.io` writes what these functions build. Version 0.5 (Zarr v3) is the
native layout; the 0.4 variants (Zarr v2) serve the ``--ngff 0.4`` export for
Fiji/QuPath users.

Examples
--------
>>> attrs = image_attrs(2, pixel_size_um=0.5)
>>> ms = attrs["ome"]["multiscales"][0]
>>> attrs["ome"]["version"], [a["name"] for a in ms["axes"]]
('0.5', ['y', 'x'])
>>> [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
[[0.5, 0.5], [1.0, 1.0]]
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "DEFAULT_COLOURS",
    "NgffVersion",
    "axes",
    "default_colours",
    "image_attrs",
    "image_label_attrs",
    "jsonable",
    "label_info",
    "labels_attrs",
    "level_scale",
    "misaligned",
    "multiscale",
    "multiscales_of",
    "ngff_version",
    "ome_block",
    "pixel_size_of",
    "semdask_attrs",
    "shard_shape",
]

NgffVersion = Literal["0.4", "0.5"]

#: RGBA colours used when a caller gives none (pore, Ni, NiO, YSZ-like, then more).
DEFAULT_COLOURS: tuple[tuple[int, int, int, int], ...] = (
    (0, 0, 0, 255),
    (230, 159, 0, 255),
    (86, 180, 233, 255),
    (0, 158, 115, 255),
    (240, 228, 66, 255),
    (0, 114, 178, 255),
    (213, 94, 0, 255),
    (204, 121, 167, 255),
)


def default_colours(n: int) -> list[tuple[int, int, int, int]]:
    """``n`` distinct RGBA colours (a colour-blind-safe palette, then greys).

    >>> default_colours(2)
    [(0, 0, 0, 255), (230, 159, 0, 255)]
    """
    out = list(DEFAULT_COLOURS[:n])
    for i in range(len(out), n):
        g = int(40 + (i * 37) % 200)
        out.append((g, g, g, 255))
    return out


def axes(names: Sequence[str], *, unit: str | None = "micrometer") -> list[dict[str, Any]]:
    """NGFF axis list: ``c`` is a channel axis, ``z``/``y``/``x`` are space axes.

    >>> axes("cyx")[0], axes("yx", unit=None)[1]
    ({'name': 'c', 'type': 'channel'}, {'name': 'x', 'type': 'space'})
    """
    out: list[dict[str, Any]] = []
    for n in names:
        if n == "c":
            out.append({"name": "c", "type": "channel"})
        else:
            ax: dict[str, Any] = {"name": n, "type": "space"}
            if unit is not None:
                ax["unit"] = unit
            out.append(ax)
    return out


def level_scale(level: int, names: Sequence[str], pixel_size_um: float | None) -> list[float]:
    """Scale vector of pyramid ``level``: pixel size x 2**level on space axes.

    An unknown pixel size is written as 1.0 (pixels).

    >>> level_scale(2, "cyx", 0.25)
    [1.0, 1.0, 1.0]
    """
    px = 1.0 if pixel_size_um is None else float(pixel_size_um)
    return [1.0 if n == "c" else px * 2.0**level for n in names]


def multiscale(
    levels: int,
    *,
    names: Sequence[str] = ("y", "x"),
    pixel_size_um: float | None,
    name: str | None = None,
    method: str = "mean",
    version: NgffVersion = "0.5",
) -> dict[str, Any]:
    """One ``multiscales`` entry with datasets ``"0" .. str(levels - 1)``.

    >>> ms = multiscale(1, pixel_size_um=None, version="0.4")
    >>> ms["version"], ms["datasets"][0]["path"], "unit" in ms["axes"][0]
    ('0.4', '0', False)
    """
    unit = None if pixel_size_um is None else "micrometer"
    ms: dict[str, Any] = {}
    if version == "0.4":
        ms["version"] = "0.4"
    if name is not None:
        ms["name"] = name
    ms["axes"] = axes(names, unit=unit)
    ms["datasets"] = [
        {
            "path": str(i),
            "coordinateTransformations": [
                {"type": "scale", "scale": level_scale(i, names, pixel_size_um)}
            ],
        }
        for i in range(levels)
    ]
    ms["type"] = method
    ms["metadata"] = {"method": f"semdask 2x {method} downsampling"}
    return ms


def ome_block(content: dict[str, Any], version: NgffVersion = "0.5") -> dict[str, Any]:
    """Wrap NGFF content: under ``"ome"`` (0.5) or at the top level (0.4).

    >>> ome_block({"labels": ["a"]}), ome_block({"labels": ["a"]}, "0.4")
    ({'ome': {'version': '0.5', 'labels': ['a']}}, {'labels': ['a']})
    """
    if version == "0.5":
        return {"ome": {"version": "0.5", **content}}
    return dict(content)


def image_attrs(
    levels: int,
    *,
    pixel_size_um: float | None,
    names: Sequence[str] = ("y", "x"),
    name: str | None = None,
    method: str = "mean",
    version: NgffVersion = "0.5",
) -> dict[str, Any]:
    """Group attributes of a multiscale image (without the ``semdask`` block)."""
    ms = multiscale(
        levels, names=names, pixel_size_um=pixel_size_um, name=name, method=method,
        version=version,
    )
    return ome_block({"multiscales": [ms]}, version)


def labels_attrs(names: Sequence[str], *, version: NgffVersion = "0.5") -> dict[str, Any]:
    """Attributes of the ``labels`` group listing its label images."""
    return ome_block({"labels": list(names)}, version)


def image_label_attrs(
    levels: int,
    *,
    classes: Sequence[str],
    colours: Sequence[Sequence[int]] | None = None,
    pixel_size_um: float | None,
    name: str | None = None,
    method: str = "mode",
    version: NgffVersion = "0.5",
) -> dict[str, Any]:
    """Attributes of one label image: ``multiscales`` + ``image-label``.

    Label value ``i`` is class ``classes[i]`` drawn in ``colours[i]``.

    >>> il = image_label_attrs(1, classes=["pore", "Ni"], pixel_size_um=1.0)["ome"]["image-label"]
    >>> il["colors"][1], il["properties"][1], il["source"]
    ({'label-value': 1, 'rgba': [230, 159, 0, 255]}, {'label-value': 1, 'name': 'Ni'}, \
{'image': '../../'})
    """
    cols = list(colours) if colours is not None else default_colours(len(classes))
    if len(cols) != len(classes):
        raise ValueError(f"{len(classes)} classes but {len(cols)} colours")
    label: dict[str, Any] = {}
    if version == "0.4":
        label["version"] = "0.4"
    label["colors"] = [
        {"label-value": i, "rgba": [int(v) for v in c]} for i, c in enumerate(cols)
    ]
    label["properties"] = [{"label-value": i, "name": str(n)} for i, n in enumerate(classes)]
    label["source"] = {"image": "../../"}
    ms = multiscale(
        levels, pixel_size_um=pixel_size_um, name=name, method=method, version=version
    )
    return ome_block({"multiscales": [ms], "image-label": label}, version)


def ngff_version(attrs: dict[str, Any]) -> str | None:
    """NGFF version of group attributes, or None when they are not OME-NGFF.

    >>> ngff_version({"ome": {"version": "0.5"}}), ngff_version({"multiscales": [{}]})
    ('0.5', '0.4')
    """
    if isinstance(attrs.get("ome"), dict):
        return str(attrs["ome"].get("version", "0.5"))
    ms = attrs.get("multiscales")
    if isinstance(ms, list) and ms:
        return str(ms[0].get("version", "0.4"))
    if "labels" in attrs or "image-label" in attrs:
        return "0.4"
    return None


def multiscales_of(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``multiscales`` list of 0.5 or 0.4 attributes (empty when absent)."""
    block = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    ms = block.get("multiscales")
    return list(ms) if isinstance(ms, list) else []


# ---------------------------------------------------------------- pyramid levels


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    return str(o)


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """A JSON-safe copy (numpy scalars/arrays, dataclasses, pydantic models, paths).

    >>> jsonable({"a": np.float32(0.5), "b": (1, 2)})
    {'a': 0.5, 'b': [1, 2]}
    """
    return dict(json.loads(json.dumps(d, default=_json_default)))


def semdask_attrs(attrs: dict[str, Any] | None, pixel_size_um: float | None, *,
                  complete: bool = False, **extra: Any) -> dict[str, Any]:
    """The ``semdask`` attribute block: caller attrs + version, complete, pixel size.

    >>> from semdask import __version__
    >>> b = semdask_attrs({"source": "a.tif"}, 0.5)
    >>> b["complete"], b["pixel_size_um"], b["version"] == __version__, b["source"]
    (False, 0.5, True, 'a.tif')
    """
    from semdask import __version__

    px = None if pixel_size_um is None else float(pixel_size_um)
    return jsonable({**(attrs or {}), **extra, "version": __version__, "complete": complete,
                     "pixel_size_um": px})


def pixel_size_of(attrs: dict[str, Any]) -> float | None:
    """Pixel size in µm: the ``semdask`` block's, else a micrometer level-0 scale.

    >>> pixel_size_of(image_attrs(1, pixel_size_um=0.3)), pixel_size_of({"semdask": {}})
    (0.3, None)
    """
    if "semdask" in attrs:
        px = (attrs["semdask"] or {}).get("pixel_size_um")
        return None if px is None else float(px)
    ms = multiscales_of(attrs)
    if not ms:
        return None
    space = [a for a in ms[0]["axes"] if a.get("type") == "space"]
    if not space or any(a.get("unit") != "micrometer" for a in space):
        return None
    return float(ms[0]["datasets"][0]["coordinateTransformations"][0]["scale"][-1])


def label_info(attrs: dict[str, Any]) -> tuple[list[str], list[tuple[int, int, int, int]]]:
    """Class names and RGBA colours (index = label value) from ``image-label`` attributes.

    >>> label_info(image_label_attrs(1, classes=["a", "b"], pixel_size_um=None))[0]
    ['a', 'b']
    """
    il = (attrs.get("ome") or attrs).get("image-label") or {}
    names = {int(d["label-value"]): str(d.get("name", d["label-value"]))
             for d in il.get("properties") or []}
    cols = {int(d["label-value"]): tuple(int(v) for v in d["rgba"])
            for d in il.get("colors") or [] if d.get("rgba") is not None}
    n = max([*names, *cols], default=-1) + 1
    fallback = default_colours(n)
    return ([names.get(i, str(i)) for i in range(n)],
            [cols.get(i, fallback[i]) for i in range(n)])  # type: ignore[misc]


# ---------------------------------------------------------------- shard grid


def shard_shape(shape: Sequence[int], names: str, *, chunk: int | None = None,
                chunks: Sequence[Sequence[int]] | None = None) -> tuple[int, ...]:
    """Shard edges: whole channel axis; ``chunk`` or the first dask chunk on y/x.

    A y/x axis held in a single dask chunk gets its length rounded up to 16.

    >>> shard_shape((4, 1000, 1333), "cyx", chunk=512)
    (4, 512, 512)
    >>> shard_shape((1000, 1333), "yx", chunks=((300, 700), (1333,)))
    (300, 1344)
    """
    out = []
    for ax, n in enumerate(names):
        size = max(int(shape[ax]), 1)
        if n == "c":
            out.append(size)
        elif chunk is not None:
            out.append(int(chunk))
        elif chunks is not None and len(chunks[ax]) > 1:
            out.append(int(chunks[ax][0]))
        else:
            out.append(16 * math.ceil(size / 16))
    return tuple(out)


def misaligned(chunks: Sequence[Sequence[int]], grid: Sequence[int]) -> tuple[int, int] | None:
    """First ``(axis, boundary)`` where a dask chunk boundary is not on the shard grid.

    >>> misaligned(((4, 4, 2),), (4,)), misaligned(((4, 3, 3),), (4,))
    (None, (0, 7))
    """
    for ax, (cs, g) in enumerate(zip(chunks, grid, strict=True)):
        bounds = np.cumsum(cs)[:-1]
        bad = bounds[bounds % g != 0]
        if bad.size:
            return ax, int(bad[0])
    return None
