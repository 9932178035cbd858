"""Pyramid levels >= 1 of a segmentation output: rebuilt, recorded, audited.

:func:`finish` ends every ``semdask segment`` run (fresh or resumed): it rebuilds the
pyramid of every output from level 0, records the CRC-32 of every shard of every level
>= 1 in the ledger (``levels.json``, under the run key) and only then marks the groups
complete. :func:`audit_levels` checks those shards for ``verify`` and ``--resume``;
outputs written before the levels were recorded are checked against the level below,
downsampled again. Readers check the same records block by block
(:mod:`semdask.storage.integrity`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from semdask.errors import StoreError
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.storage import pyramid
from semdask.storage.integrity import (
    LEDGER,
    LEVELS,
    atomic_write,
    checksum,
    read_header,
    read_levels,
    shard_files,
)
from semdask.storage.ome import multiscales_of

__all__ = ["audit_levels", "finish"]


def _level_paths(store: Path, group: str) -> tuple[list[str], bool]:
    """Dataset paths of ``group``'s levels and whether it is a label (mode) pyramid."""
    ms = multiscales_of(sarr.read_attrs(store, group))
    if not ms:
        return ["0"], False
    return [str(d["path"]) for d in ms[0]["datasets"]], ms[0].get("type") == "mode"


def _crc_of(arr: Any, region: tuple[Any, ...]) -> int:
    return checksum(arr[region])


def finish(store: str | os.PathLike[str], group: str, outputs: Sequence[str]) -> None:
    """Build every output's pyramid, record its shard checksums, then mark it complete.

    Levels >= 1 are rebuilt whole from level 0 (their old shards are deleted first, so
    a damaged one can neither survive nor fail the rewrite); the CRC-32 of every shard
    of every level >= 1, as read back from disk, goes to ``levels.json`` in the ledger
    under the run key. Only then are the groups marked complete, so a crash in between
    leaves an output that looks unfinished, never one that looks verified.

    Parameters
    ----------
    store : path
        The output OME-Zarr store.
    group : str
        The label group that owns the ledger, e.g. ``"labels/phases"``.
    outputs : sequence of str
        Every group of the run (``header["outputs"]``).
    """
    import dask

    st = Path(store)
    head = read_header(st, group)
    if head is None:
        raise StoreError(f"ledger of {st}/{group}", expected="a ledger header",
                         got="none", fix="run semdask segment on this store first")
    doc: dict[str, Any] = {"key": head.get("key"), "outputs": {}}
    for g in outputs:
        paths, _ = _level_paths(st, g)
        for k, sub in enumerate(paths[1:], start=1):
            arr = sio.open_array(st, g, k)
            h, w = arr.shape[-2:]
            for f in shard_files(st, g, arr, ((0, h), (0, w)), level=sub):
                f.unlink(missing_ok=True)
        arrays = sarr.build_pyramid(st, g)
        tasks = {(k, key): dask.delayed(_crc_of, pure=False)(a, reg)
                 for k, a in enumerate(arrays) if k for key, reg in _shard_regions(a)}
        sums = dict(zip(tasks, dask.compute(*tasks.values()), strict=True))
        doc["outputs"][g] = {str(k): {key: int(v) for (kk, key), v in sums.items() if kk == k}
                             for k in range(1, len(arrays))}
    atomic_write(st / group / LEDGER / LEVELS, json.dumps(doc))
    for g in outputs:
        sarr.set_complete(st, g)


def _shard_regions(arr: Any) -> list[tuple[str, tuple[Any, ...]]]:
    sy, sx = tuple(arr.shards or arr.chunks)[-2:]
    h, w = arr.shape[-2:]
    return [(f"{iy},{ix}", (Ellipsis, slice(y, min(y + sy, h)), slice(x, min(x + sx, w))))
            for iy, y in enumerate(range(0, h, sy)) for ix, x in enumerate(range(0, w, sx))]


def audit_levels(store: str | os.PathLike[str], group: str,
                 header: dict[str, Any]) -> dict[str, str]:
    """Problems of the pyramid levels >= 1 of every output of ``header``.

    Each shard is compared with its CRC-32 in ``levels.json``; outputs written before
    levels were recorded are compared with the level below, downsampled again.

    Returns
    -------
    dict
        ``{"<group> level <k> shard <iy>,<ix>": problem}`` (empty when intact); problems
        are ``missing shard``, ``checksum mismatch``, ``unreadable (...)``,
        ``differs from level k-1`` and ``missing level``.
    """
    st = Path(store)
    doc = read_levels(st, group)
    recorded = doc is not None and doc.get("key") == header.get("key")
    out: dict[str, str] = {}
    for g in header.get("outputs", [group]):
        try:
            paths, mode = _level_paths(st, g)
        except StoreError:
            continue  # a missing output is reported by audit()
        want_all = ((doc or {}).get("outputs") or {}).get(g) or {} if recorded else {}
        for k in range(1, len(paths)):
            try:
                arr = sio.open_array(st, g, k)
            except StoreError:
                out[f"{g} level {k}"] = "missing level"
                continue
            want = want_all.get(str(k))
            for key, reg in _shard_regions(arr):
                where = f"{g} level {k} shard {key}"
                try:
                    block = np.asarray(arr[reg])
                except Exception as e:  # a corrupt shard fails to decode
                    out[where] = f"unreadable ({type(e).__name__})"
                    continue
                if want is not None:
                    if checksum(block) != want.get(key):
                        (ys, xs) = reg[-2:]
                        sl = ((ys.start, ys.stop), (xs.start, xs.stop))
                        gone = [f for f in shard_files(st, g, arr, sl, level=paths[k])
                                if not f.is_file()]
                        out[where] = "missing shard" if gone else "checksum mismatch"
                elif not _matches_level_below(st, g, k, reg, block, mode):
                    out[where] = f"differs from level {k - 1} downsampled"
    return out


def _matches_level_below(store: Path, group: str, k: int, reg: tuple[Any, ...],
                         block: np.ndarray, mode: bool) -> bool:
    import dask.array as da

    (ys, xs) = reg[-2:]
    prev = sio.open_array(store, group, k - 1)
    try:
        src = np.asarray(prev[..., 2 * ys.start:2 * ys.stop, 2 * xs.start:2 * xs.stop])
    except Exception:  # the level below is unreadable: this one cannot be trusted either
        return False
    down = pyramid.downsample_mode if mode else pyramid.downsample_mean
    exp = np.asarray(down(da.from_array(src, chunks=src.shape)).compute())
    return exp.shape == block.shape and bool(np.array_equal(exp, block))
