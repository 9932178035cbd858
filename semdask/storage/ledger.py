"""Per-block ledger of a segmentation output: resume, staleness and ``verify``.

The ledger of ``<out>/labels/<name>`` is the Zarr group
``<out>/labels/<name>/.semdask-ledger``: its attributes hold the run header (run
key, inference plan, chunk grid, outputs), and every finished block adds one
small JSON record ``b.<iy>.<ix>.json`` beside it (block index, global slice,
status, CRC-32 of every output block, time, worker). Records are written by the
task that wrote the block, after its shards, atomically (temporary file +
rename), so a record exists only for a block whose data are on disk. Plain JSON
files on a shared filesystem need no locks: each block writes its own file.
When every block is written, :func:`finish` (:mod:`semdask.storage.levels`) rebuilds
the pyramids and records the CRC-32 of every shard of levels >= 1 (``levels.json``)
before the outputs are marked complete; :func:`verify` and ``--resume`` check every
level, and readers check what they read (:mod:`semdask.storage.integrity`).

The run key is the SHA-256 of everything the labels depend on: input identity
(shape, dtype, level-0 metadata, shard sizes, a checksum of the coarsest pyramid
level; the path is recorded, not hashed, so a moved store keeps its key), model
hash, plan, precision, normalisation statistics, outputs and the semdask version.
A record with another key is stale.

This module is part of the storage layer: it owns the ledger's sidecar files;
every Zarr array it touches comes from :mod:`semdask.storage.io`.

Examples
--------
>>> import numpy as np
>>> checksum(np.zeros((2, 2), np.uint8)) == checksum(np.zeros((2, 2), np.uint8))
True
>>> len(run_key({"path": "m.ome.zarr"}, model_sha="0" * 64, plan={"window": 256}))
64
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semdask import __version__
from semdask.errors import StoreError
from semdask.paths import validate_input_path
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.storage.integrity import (
    LEDGER,
    LEVELS,
    atomic_write,
    block_slices,
    checksum,
    read_header,
    read_records,
    shard_files,
)
from semdask.storage.levels import audit_levels, finish
from semdask.storage.ome import multiscales_of

__all__ = [
    "LEDGER",
    "WRITER",
    "Audit",
    "Ledger",
    "audit",
    "audit_levels",
    "block_slices",
    "checksum",
    "clear_shards",
    "finish",
    "input_identity",
    "run_key",
    "verify",
    "write_block",
    "written_by_segment",
]

log = logging.getLogger(__name__)
WRITER = "semdask segment"  #: ``attrs["semdask"]["provenance"]["writer"]`` of segment's groups
Slices = tuple[tuple[int, int], tuple[int, int]]
Index = tuple[int, int]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def input_identity(mosaic: sio.Mosaic) -> dict[str, Any]:
    """Cheap identity of a mosaic's content: never reads level 0 itself.

    Path, shape and dtype; SHA-256 of the level-0 ``zarr.json``; SHA-256 of the
    sorted (name, size) list of level-0 shard files; CRC-32 of the coarsest level.
    """
    level0 = mosaic.path / multiscales_of(mosaic.attrs)[0]["datasets"][0]["path"]
    meta = (level0 / "zarr.json").read_bytes() if (level0 / "zarr.json").is_file() else b""
    files = sorted((str(Path(r, f).relative_to(level0)), os.path.getsize(Path(r, f)))
                   for r, _, fs in os.walk(level0 / "c") for f in fs)
    thumb = np.asarray(mosaic.level(mosaic.levels - 1).compute())
    return {"path": str(mosaic.path.resolve()), "shape": list(mosaic.image.shape),
            "dtype": str(mosaic.image.dtype), "zarr_json": _sha(meta),
            "shards": _sha(_canon(files)), "thumbnail_crc32": checksum(thumb)}


def run_key(identity: dict[str, Any], *, model_sha: str, plan: dict[str, Any],
            precision: str | None = None, stats: dict[str, Any] | None = None,
            outputs: Sequence[str] = (), version: str = __version__) -> str:
    """SHA-256 (hex) of input identity, model, plan, precision, statistics, outputs, version.

    The identity's ``path`` is left out: a mosaic copied or moved with its outputs
    (e.g. staged to node-local scratch) keeps its key; its content fingerprint decides.
    """
    content = {k: v for k, v in identity.items() if k != "path"}
    return _sha(_canon({"input": content, "model": model_sha, "plan": plan,
                        "precision": precision, "stats": stats, "outputs": list(outputs),
                        "version": version}))


class Ledger:
    """The ledger group of one label output: a header and one record per block.

    Parameters
    ----------
    store : path
        The output OME-Zarr store.
    group : str
        The label group, e.g. ``"labels/phases"``.
    """

    def __init__(self, store: str | os.PathLike[str], group: str) -> None:
        self.store = Path(store)
        self.group = group
        self.dir = self.store / group / LEDGER

    def header(self) -> dict[str, Any] | None:
        """The run header, or None when there is no ledger."""
        return read_header(self.store, self.group)

    def begin(self, header: dict[str, Any], *, keep_records: bool) -> None:
        """Write the header (a Zarr group's attributes); drop old records unless kept."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not keep_records:
            for f in [*self.dir.glob("b.*.json"), self.dir / LEVELS]:
                f.unlink(missing_ok=True)
        meta = {"zarr_format": 3, "node_type": "group",
                "attributes": {"semdask-ledger": {**header, "updated": time.time()}}}
        atomic_write(self.dir / "zarr.json", json.dumps(meta, indent=1, default=str))

    def records(self) -> dict[Index, dict[str, Any]]:
        """Every readable block record, by block index."""
        return read_records(self.store, self.group)

    def write(self, record: dict[str, Any]) -> None:
        """Write one block record atomically."""
        iy, ix = record["block"]
        atomic_write(self.dir / f"b.{iy}.{ix}.json", json.dumps(record, default=str))


def write_block(index: Index, slices: Slices, blocks: Sequence[np.ndarray],
                targets: Sequence[Any], names: Sequence[str], *, store: str, group: str,
                key: str, delay: float = 0.0) -> dict[str, Any]:
    """Task: write one block of every output (shard-aligned), then record it in the ledger.

    ``blocks[i]`` goes to ``targets[i]`` (a zarr array) at ``slices`` (y/x; a leading
    channel axis is written whole). ``delay`` (seconds, before writing) is a
    fault-injection hook for tests (``semdask.testing.block-delay``).
    """
    t0 = time.time()
    if delay:
        time.sleep(delay)
    (y0, y1), (x0, x1) = slices
    sums = {}
    for block, tgt, name in zip(blocks, targets, names, strict=True):
        region = (Ellipsis, slice(y0, y1), slice(x0, x1))
        tgt[region] = block
        sums[name] = checksum(block)
    rec = {"key": key, "block": list(index), "slice": [[y0, y1], [x0, x1]], "status": "done",
           "checksums": sums, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "seconds": round(time.time() - t0, 3), "worker": f"{socket.gethostname()}:{os.getpid()}"}
    Ledger(store, group).write(rec)
    return rec


def clear_shards(store: str | os.PathLike[str], groups: Sequence[str], arrays: Sequence[Any],
                 slices: Sequence[Slices]) -> int:
    """Delete the stored shards of blocks about to be rewritten; return how many.

    A block owns its shards (writes are shard-aligned), and zarr merges a partial
    write into an existing shard, so a corrupt shard would fail the rewrite.
    """
    n = 0
    for g, arr in zip(groups, arrays, strict=True):
        for sl in slices:
            for f in shard_files(Path(store), g, arr, sl):
                if f.is_file():
                    f.unlink()
                    n += 1
    return n


def audit(store: str | os.PathLike[str], group: str, header: dict[str, Any],
          records: dict[Index, dict[str, Any]]) -> dict[Index, str]:
    """Problem of every block of ``header["chunks"]`` ("ok" when present, recorded, intact).

    Problems: ``not recorded``, ``stale record`` (another run key), ``missing shard``,
    ``checksum mismatch``, ``unreadable``, ``missing output``.
    """
    st = Path(store)
    arrays: dict[str, Any] = {}
    for name in header.get("outputs", [group]):
        try:
            arrays[name] = sio.open_array(st, name)
        except StoreError:
            arrays[name] = None
    out: dict[Index, str] = {}
    for idx, sl in block_slices(header["chunks"]).items():
        rec = records.get(idx)
        if rec is None:
            out[idx] = "not recorded"
            continue
        if rec.get("key") != header.get("key") or rec.get("status") != "done":
            out[idx] = "stale record"
            continue
        out[idx] = "ok"
        for name, arr in arrays.items():
            if arr is None:
                out[idx] = f"missing output {name}"
                break
            (y0, y1), (x0, x1) = sl
            try:
                crc = checksum(arr[..., y0:y1, x0:x1])
            except Exception as e:  # a corrupt shard fails to decode
                out[idx] = f"unreadable {name} ({type(e).__name__})"
                break
            if crc != (rec.get("checksums") or {}).get(name):
                gone = [f for f in shard_files(st, name, arr, sl) if not f.is_file()]
                out[idx] = f"missing shard {name}" if gone else f"checksum mismatch {name}"
                break
    return out


@dataclass
class Audit:
    """Result of :func:`verify`: holes and corrupt blocks of one label output."""

    output: Path
    group: str
    blocks: int
    problems: dict[Index, str] = field(default_factory=dict)
    slices: dict[Index, Slices] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)
    source: str | None = None
    note: str = ""
    levels: dict[str, str] = field(default_factory=dict)
    foreign: bool = False  #: the group was not written by semdask segment (nothing to repair)

    @property
    def ok(self) -> bool:
        """True when every block and pyramid shard is intact, and groups are complete."""
        return not self.problems and not self.incomplete and not self.note and not self.levels

    def table(self) -> str:
        """A human-readable table of the holes (or a one-line OK)."""
        if self.ok:
            return (f"{self.output}/{self.group}: OK, {self.blocks} blocks present, recorded "
                    "and matching their checksums; pyramid levels intact; complete")
        lines = [f"{self.output}/{self.group}: {len(self.problems)} of {self.blocks} blocks "
                 "bad" + (f", {len(self.levels)} pyramid shards bad" if self.levels else "")
                 + (f"; {self.note}" if self.note else "")]
        if self.problems:
            lines.append(f"{'block':>9}  {'y0:y1':>13}  {'x0:x1':>13}  problem")
            for (iy, ix), why in sorted(self.problems.items()):
                (y0, y1), (x0, x1) = self.slices.get((iy, ix), ((0, 0), (0, 0)))
                lines.append(f"{f'{iy},{ix}':>9}  {f'{y0}:{y1}':>13}  {f'{x0}:{x1}':>13}  {why}")
        lines += [f"{where}: {why}" for where, why in sorted(self.levels.items())]
        lines += [f"group {g}: marked incomplete" for g in self.incomplete]
        return "\n".join(lines)

    def fix(self) -> str:
        """The command that repairs the output; never one that writes into foreign labels."""
        if self.foreign:
            return (f"none: {self.group} was not written by semdask segment, so there is no "
                    "ledger to check it against and nothing to repair (it is left as it is); "
                    "verify the labels segment wrote, e.g. --labels phases")
        src = self.source or str(self.output)
        out = "" if Path(src).resolve() == self.output.resolve() else f" --output {self.output}"
        name = self.group.split("/", 1)[-1]
        extra = "" if name == "phases" else f" --name {name}"
        return f"semdask segment {src}{out}{extra} --resume"


def verify(output: str | os.PathLike[str], labels: str = "phases") -> Audit:
    """Audit a segmentation output: every block and pyramid shard present and intact.

    Parameters
    ----------
    output : path
        The OME-Zarr store holding ``labels/<labels>`` (and probs/confidence).
    labels : str
        The label group name.

    Returns
    -------
    Audit
        ``ok`` is False on holes, corruption (level 0 or any pyramid level), stale
        records, a missing ledger or an output group not marked complete.
    """
    p = validate_input_path(Path(output), kind="dir")
    group = f"labels/{labels}"
    sarr.read_attrs(p, group)  # StoreError with a fix when missing
    head = Ledger(p, group).header()
    # the mosaic it was segmented from: the mosaic a segment copy names, else the store itself
    # (a converted mosaic's "source" is its image file; a moved store's old paths are stale)
    root = sarr.read_attrs(p).get("semdask") or {}
    src = root.get("source") if isinstance(root.get("source"), str) and (
        root.get("writer") == WRITER or str(root["source"]).rstrip("/").endswith(".zarr")) else None
    if head is None:
        ours = written_by_segment(p, group)
        return Audit(p, group, 0, source=src, foreign=not ours,
                     note="no ledger (its records were lost)" if ours
                     else "no ledger (not written by semdask segment)")
    problems = {k: v for k, v in audit(p, group, head, Ledger(p, group).records()).items()
                if v != "ok"}
    incomplete = [g for g in head.get("outputs", [group]) if not _complete(p, g)]
    return Audit(p, group, len(block_slices(head["chunks"])), problems,
                 block_slices(head["chunks"]), incomplete, source=src,
                 levels=audit_levels(p, group, head))


def _complete(store: Path, group: str) -> bool:
    try:
        return (sarr.read_attrs(store, group).get("semdask") or {}).get("complete") is True
    except StoreError:
        return False


def written_by_segment(store: str | os.PathLike[str], group: str) -> bool:
    """True when ``semdask segment`` wrote ``group`` of ``store`` (and may replace it).

    Its provenance names :data:`WRITER`, or (outputs of earlier versions) it has a
    ledger, or a provenance with segment's model hash and inference plan. Anything
    else (imported truth, ``semdask label`` output, an image) is foreign.
    """
    p = Path(store)
    if (p / group / LEDGER / "zarr.json").is_file():
        return True
    try:
        prov = (sarr.read_attrs(p, group).get("semdask") or {}).get("provenance")
    except StoreError:
        return False
    if not isinstance(prov, dict):
        return False
    model = prov.get("model")
    return prov.get("writer") == WRITER or (isinstance(model, dict) and "sha256" in model
                                            and "plan" in prov)
