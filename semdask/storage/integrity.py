"""Checked reads of segmentation outputs: the ledger's checksums, verified block by block.

Every output written by ``semdask segment`` carries a ledger
(``labels/<name>/.semdask-ledger``, :mod:`semdask.storage.ledger`): one record per
level-0 block with the CRC-32 of every output block, and ``levels.json`` with the
CRC-32 of every shard of the pyramid levels >= 1. :func:`checked_level` turns a level
of such an output into a dask array whose tasks each read one block, compare its
CRC-32 with the recorded one and map a shard that fails to decode to the same
:class:`~semdask.errors.DamagedOutputError`, so a reader never computes on damaged
data and the check costs one CRC per block, inside the task that reads it. Groups
without a ledger (imported truth, EDS labels, images) are read as they are.

This module sits below :mod:`semdask.storage.io` (which calls it) and
:mod:`semdask.storage.ledger` (which writes what it checks); it imports neither.

Examples
--------
>>> import numpy as np
>>> checksum(np.arange(4, dtype=np.uint8)) == checksum(np.arange(4, dtype=np.uint8))
True
>>> block_slices(((2, 3), (4,)))
{(0, 0): ((0, 2), (0, 4)), (1, 0): ((2, 5), (0, 4))}
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from semdask.errors import DamagedOutputError

__all__ = [
    "LEDGER",
    "LEVELS",
    "atomic_write",
    "block_slices",
    "checked_level",
    "checksum",
    "ledger_group_of",
    "read_header",
    "read_levels",
    "read_records",
    "repair_hint",
    "shard_files",
]

log = logging.getLogger(__name__)
LEDGER = ".semdask-ledger"
LEVELS = "levels.json"
Slices = tuple[tuple[int, int], tuple[int, int]]
Index = tuple[int, int]


def checksum(block: np.ndarray) -> int:
    """CRC-32 of the C-ordered bytes of ``block`` (dtype and shape are in the header)."""
    return zlib.crc32(np.ascontiguousarray(block).tobytes()) & 0xFFFFFFFF


def block_slices(chunks: Sequence[Sequence[int]]) -> dict[Index, Slices]:
    """``{(iy, ix): ((y0, y1), (x0, x1))}`` of a 2-D dask chunk grid."""
    ys, xs = (np.concatenate([[0], np.cumsum(c)]).astype(int) for c in chunks)
    return {(iy, ix): ((int(ys[iy]), int(ys[iy + 1])), (int(xs[ix]), int(xs[ix + 1])))
            for iy in range(len(ys) - 1) for ix in range(len(xs) - 1)}


# ------------------------------------------------------------------ ledger files


def read_header(store: str | os.PathLike[str], group: str) -> dict[str, Any] | None:
    """The run header of ``group``'s ledger, or None when it has none."""
    try:
        meta = json.loads((Path(store) / group / LEDGER / "zarr.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    head = (meta.get("attributes") or {}).get("semdask-ledger")
    return head if isinstance(head, dict) else None


def read_records(store: str | os.PathLike[str], group: str) -> dict[Index, dict[str, Any]]:
    """Every readable block record of ``group``'s ledger, by block index."""
    out: dict[Index, dict[str, Any]] = {}
    for f in (Path(store) / group / LEDGER).glob("b.*.json"):
        try:
            rec = json.loads(f.read_text())
            out[(int(rec["block"][0]), int(rec["block"][1]))] = rec
        except (ValueError, KeyError, TypeError, IndexError):
            log.warning("unreadable ledger record %s (block will be recomputed)", f)
    return out


def read_levels(store: str | os.PathLike[str], group: str) -> dict[str, Any] | None:
    """The pyramid checksums (``levels.json``) of ``group``'s ledger, or None."""
    try:
        doc = json.loads((Path(store) / group / LEDGER / LEVELS).read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def ledger_group_of(store: str | os.PathLike[str], group: str) -> str | None:
    """The label group whose ledger covers ``group`` (itself, or e.g. ``probs``), or None."""
    if read_header(store, group) is not None:
        return group
    labels = Path(store) / "labels"
    if group.startswith("labels/") or not labels.is_dir():
        return None
    owners = []  # several runs may have listed it: the latest one wrote it
    for d in sorted(labels.iterdir()):
        head = read_header(store, f"labels/{d.name}")
        if head is not None and group in head.get("outputs", []):
            owners.append((float(head.get("updated") or 0.0), f"labels/{d.name}"))
    return max(owners)[1] if owners else None


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_files(store: Path, group: str, arr: Any, slices: Slices,
                level: str = "0") -> list[Path]:
    """Files of the shards of ``group``'s level ``level`` that ``slices`` (y/x) touch."""
    (y0, y1), (x0, x1) = slices
    sy, sx = (arr.shards or arr.chunks)[-2:]
    lead = (0,) * (arr.ndim - 2)
    return [store / group / level / arr.metadata.encode_chunk_key((*lead, iy, ix))
            for iy in range(y0 // sy, -(-y1 // sy)) for ix in range(x0 // sx, -(-x1 // sx))]


def repair_hint(store: str | os.PathLike[str], group: str) -> str:
    """``semdask verify ...`` then ``semdask segment ... --resume`` for ``store``'s output."""
    p = Path(store)
    src = str(p)
    try:
        root = json.loads((p / "zarr.json").read_text()).get("attributes") or {}
        src = str((root.get("semdask") or {}).get("source") or p)
    except (OSError, ValueError):
        pass
    name = group.split("/", 1)[-1]
    out = "" if Path(src).resolve() == p.resolve() else f" --output {p}"
    extra = "" if name == "phases" else f" --name {name}"
    labels = "" if name == "phases" else f" --labels {name}"
    return (f"see what is damaged with `semdask verify {p}{labels}`, then repair it with "
            f"`semdask segment {src}{out}{extra} --resume`")


# ------------------------------------------------------------------ checked reads


def _damaged(store: Path, ledger_group: str, what: str, got: str) -> DamagedOutputError:
    return DamagedOutputError(f"{what} of {store}", expected="the data recorded in its ledger "
                              "when semdask segment wrote it", got=got,
                              fix=repair_hint(store, ledger_group))


class _Checked:
    """Array-like over one zarr array: each block read is checked against its CRC-32."""

    def __init__(self, arr: Any, chunks: tuple[tuple[int, ...], ...],
                 sums: dict[Index, int | None], *, store: Path, group: str, ledger_group: str,
                 level: int) -> None:
        self.arr = arr
        self.shape = tuple(arr.shape)
        self.dtype = arr.dtype
        self.ndim = len(self.shape)
        self.sums = sums
        self.store, self.group, self.ledger_group, self.level = store, group, ledger_group, level
        self.edges = [[int(v) for v in np.cumsum((0, *c))] for c in chunks[-2:]]

    def read(self, sel: tuple[slice, ...]) -> np.ndarray:
        (ys, xs) = sel[-2:]
        idx = (bisect.bisect_right(self.edges[0], ys.start or 0) - 1,
               bisect.bisect_right(self.edges[1], xs.start or 0) - 1)
        whole = all(e[i:i + 2] == [s.start, s.stop]  # a whole recorded block
                    for e, i, s in zip(self.edges, idx, (ys, xs), strict=True))
        what = (f"block {idx[0]},{idx[1]} (y {ys.start}:{ys.stop}, x {xs.start}:{xs.stop}) of "
                f"{self.group} level {self.level}")
        try:
            block = np.asarray(self.arr[sel])
        except (MemoryError, OSError):
            raise
        except Exception as e:  # zarr/blosc/crc32c errors of a corrupt shard
            raise _damaged(self.store, self.ledger_group, what,
                           f"a shard that cannot be decoded ({type(e).__name__}: {e})") from None
        want = self.sums.get(idx) if whole else None
        if want is not None and checksum(block) != want:
            raise _damaged(self.store, self.ledger_group, what, "different data (CRC-32 "
                           f"{checksum(block):08x}, recorded {want:08x}): a shard was "
                           "deleted or altered after it was written")
        return block


def _get(x: _Checked, sel: tuple[slice, ...]) -> np.ndarray:
    return x.read(sel)


def checked_level(arr: Any, store: str | os.PathLike[str], group: str,
                  level: int) -> da.Array | None:
    """Level ``level`` of ``group`` as a dask array checked against its ledger.

    Parameters
    ----------
    arr : zarr.Array
        The opened level array.
    store : path
        The OME-Zarr store.
    group : str
        ``labels/<name>`` or a sibling output of it (``probs``, ``confidence``...).
    level : int
        Pyramid level of ``arr``.

    Returns
    -------
    dask.array.Array or None
        None when no ledger covers ``group`` (read it as it is). Level 0 is chunked
        like the ledger's blocks, levels >= 1 like their shards.

    Raises
    ------
    DamagedOutputError
        Now, when the ledger does not record every block of the current run or
        disagrees with the array's shape; at compute time, from the task of the first
        block whose data differ from its record or whose shard fails to decode.
    """
    p = Path(store)
    owner = ledger_group_of(p, group)
    if owner is None:
        return None
    head = read_header(p, owner) or {}
    key = head.get("key")
    sums: dict[Index, int | None]
    if level == 0:
        grid = tuple(tuple(int(v) for v in c) for c in head.get("chunks", ()))
        if len(grid) != 2 or (sum(grid[0]), sum(grid[1])) != tuple(arr.shape[-2:]):
            raise _damaged(p, owner, f"ledger of {owner}", f"a block grid {grid} that does "
                           f"not cover the array's shape {tuple(arr.shape)}")
        recs = read_records(p, owner)
        blocks = block_slices(grid)
        bad = [b for b in blocks if (recs.get(b) or {}).get("key") != key
               or recs[b].get("status") != "done"]
        if bad:
            raise _damaged(p, owner, f"ledger of {owner}", f"{len(bad)} of {len(blocks)} "
                           f"blocks not recorded by the run that wrote it (first: block "
                           f"{bad[0][0]},{bad[0][1]})")
        sums = {b: (recs[b].get("checksums") or {}).get(group) for b in blocks}
        if any(v is None for v in sums.values()):
            raise _damaged(p, owner, f"ledger of {owner}", f"no checksums of {group}")
    else:
        sy, sx = tuple(arr.shards or arr.chunks)[-2:]
        h, w = arr.shape[-2:]
        grid = (tuple(min(sy, h - y) for y in range(0, h, sy)),
                tuple(min(sx, w - x) for x in range(0, w, sx)))
        doc = read_levels(p, owner)
        rec = (((doc or {}).get("outputs") or {}).get(group) or {}).get(str(level))
        if doc is None or doc.get("key") != key or rec is None:
            log.debug("%s/%s level %d has no recorded checksums (older semdask): decode "
                      "errors are still caught", p, group, level)
            sums = {}
        else:
            sums = {(int(k.split(",")[0]), int(k.split(",")[1])): int(v)
                    for k, v in rec.items()}
    chunks = (*((int(s),) for s in arr.shape[:-2]), *grid)
    name = "semdask-checked-" + hashlib.sha256(json.dumps(
        [str(p.resolve()), group, level, key, sorted(map(list, sums.items()))],
        default=str).encode()).hexdigest()[:24]
    wrapper = _Checked(arr, chunks, sums, store=p, group=group, ledger_group=owner, level=level)
    return da.from_array(wrapper, chunks=chunks, name=name, getitem=_get,
                         meta=np.empty((0,) * arr.ndim, arr.dtype), asarray=False)
