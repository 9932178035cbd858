"""Who owns an output: what ``semdask segment`` may write, replace or resume.

``segment`` writes either into its input mosaic (``labels/<name>`` and sibling groups,
the default) or into an output store of its own: a copy of the input's image, whose
root attributes name the writer (:data:`~semdask.storage.ledger.WRITER`), the source
path and the source's content identity (:func:`copy_attrs`). From that provenance,
:func:`check_output` decides before anything is written:

- an output inside the input (``M.ome.zarr/labels``, ``M.ome.zarr/0``), inside any
  other Zarr store, or around the input is refused;
- a store that ``segment`` did not create (another mosaic, a converted or synthetic
  store) is refused whatever the flags: its image and labels are never deleted or
  written into;
- a copy made from another input (another content identity) is never resumed; with
  ``--overwrite`` it is replaced whole, but only when everything in it was written by
  ``segment``;
- in the input itself or in its own copy, each group to be written must be new or
  written by ``segment`` (:func:`~semdask.storage.ledger.written_by_segment`): labels of
  other tools (``labels/truth``, ``semdask label`` output) are never replaced;
- the run key in the ledger (input, model, plan, ...) then decides which blocks a
  ``--resume`` keeps.

:func:`check_output` only reads; ``segment`` calls it while holding the output's
writer lock (:mod:`semdask.storage.lock`), so nobody changes the output in between.

Examples
--------
>>> import tempfile, pathlib, numpy as np
>>> from semdask.storage import io as sio
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> m = sio.write_image(d / "m.ome.zarr", np.zeros((64, 64), np.uint8), pixel_size_um=0.1)
>>> check_output(m, None, groups=["labels/phases"]).kind
'input'
>>> check_output(m, d / "out.ome.zarr", groups=["labels/phases"]).kind
'new'
>>> check_output(m, d / "m.ome.zarr" / "labels", groups=["labels/phases"])
Traceback (most recent call last):
...
semdask.errors.ForeignOutputError: output .../m.ome.zarr/labels: expected a store outside ...
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from semdask.errors import ForeignOutputError, SemdaskError, UnsafePathError
from semdask.paths import is_store
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.storage.ledger import WRITER, input_identity, written_by_segment
from semdask.storage.ome import multiscales_of

__all__ = ["OutputCheck", "check_output", "copy_attrs", "foreign_nodes", "source_identity"]

log = logging.getLogger(__name__)
Kind = Literal["input", "new", "copy", "replace"]


@dataclass(frozen=True)
class OutputCheck:
    """What :func:`check_output` found at the output.

    ``kind``: ``"input"`` (the mosaic itself), ``"new"`` (nothing there, or an empty
    directory), ``"copy"`` (this input's own copy; its complete image is kept) or
    ``"replace"`` (a store of segment's own, replaced whole).
    """

    output: Path
    kind: Kind
    reuse_image: bool = False  #: an existing complete copy of this input's image: keep it


def source_identity(mosaic: sio.Mosaic) -> dict[str, Any]:
    """The content identity of a mosaic, without its path (shape, metadata, shards, thumbnail)."""
    return {k: v for k, v in input_identity(mosaic).items() if k != "path"}


def copy_attrs(mosaic: sio.Mosaic) -> dict[str, Any]:
    """Root ``semdask`` attributes of an output store that copies ``mosaic``'s image."""
    return {"writer": WRITER, "source": str(mosaic.path),
            "source_identity": source_identity(mosaic)}


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def _inside(child: Path, parent: Path) -> bool:
    """``child`` lies strictly below ``parent`` (resolved paths; bind mounts via samefile)."""
    return any(_same(anc, parent) for anc in child.parents)


def _enclosing_store(p: Path) -> Path | None:
    return next((anc for anc in p.parents if is_store(anc)), None)


def _root_semdask(store: Path) -> dict[str, Any]:
    try:
        return dict(sarr.read_attrs(store).get("semdask") or {})
    except (SemdaskError, OSError, ValueError):
        return {}


def _copy_of(sem: dict[str, Any], mosaic: sio.Mosaic, store: Path) -> bool | None:
    """True: a segment copy of this input; False: of another; None: not a segment copy."""
    if sem.get("writer") == WRITER and isinstance(sem.get("source_identity"), dict):
        return sem["source_identity"] == source_identity(mosaic)
    src = sem.get("source")
    if sem.get("writer") is None and isinstance(src, str) and src:  # before copy_attrs
        if Path(src).expanduser().resolve() != mosaic.path.resolve():
            return None  # convert records its input file as "source" too: not ours
        try:
            meta = sio.open_array(store, multiscales_of(sarr.read_attrs(store))[0]["datasets"]
                                  [0]["path"])
        except (SemdaskError, IndexError, KeyError):
            return False
        return tuple(meta.shape[-2:]) == tuple(mosaic.image.shape) and \
            str(meta.dtype) == str(mosaic.image.dtype)
    return None


def _image_ready(store: Path, mosaic: sio.Mosaic) -> bool:
    try:
        return tuple(sio.open_mosaic(store).image.shape) == tuple(mosaic.image.shape)
    except (SemdaskError, OSError):
        return False


def foreign_nodes(store: str | os.PathLike[str]) -> list[str]:
    """Everything in an output store that ``semdask segment`` did not write.

    The image levels of a segment copy, ``labels/`` and groups written by segment
    are its own; any other group, array or file is foreign (e.g. labels that
    ``semdask label`` or a user added to the copy afterwards).
    """
    p = Path(store)
    sem = _root_semdask(p)
    if sem.get("writer") != WRITER and not sem.get("source"):
        return ["the store itself (not a copy made by semdask segment)"]
    try:
        levels = {d["path"] for d in multiscales_of(sarr.read_attrs(p))[0]["datasets"]}
    except (SemdaskError, IndexError, KeyError, OSError):
        levels = set()
    bad = []
    for child in sorted(p.iterdir()):
        name = child.name
        if name == "zarr.json" or name in levels:
            continue
        if name == "labels" and child.is_dir():
            bad += [f"labels/{g.name}" for g in sorted(child.iterdir())
                    if g.is_dir() and not written_by_segment(p, f"labels/{g.name}")]
            continue
        if not (child.is_dir() and written_by_segment(p, name)):
            bad.append(name)
    return bad


def _refuse(what: str, expected: str, got: str, fix: str) -> ForeignOutputError:
    return ForeignOutputError(what, expected=expected, got=got, fix=fix)


def _check_groups(store: Path, groups: Sequence[str], mosaic: sio.Mosaic, where: str) -> None:
    for g in groups:
        if (store / g).exists() and not written_by_segment(store, g):
            name = g.split("/", 1)[1] if g.startswith("labels/") else None
            fix = (f"segment into new labels: semdask segment {mosaic.path}{where} --name "
                   f"{name}-seg" if name else
                   f"write {g} elsewhere: semdask segment {mosaic.path} --output NEW.ome.zarr")
            raise _refuse(f"{store}/{g}", expected="new labels or an output of semdask segment",
                          got=f"{g} written by something else (no segment provenance): "
                          "--overwrite and --resume never replace it", fix=fix)


def check_output(mosaic: sio.Mosaic, output: str | os.PathLike[str] | None, *,
                 groups: Sequence[str], overwrite: bool = False,
                 resume: bool = False) -> OutputCheck:
    """Decide whether ``segment`` may write ``groups`` to ``output`` (reads only).

    Parameters
    ----------
    mosaic : Mosaic
        The input.
    output : path or None
        The output store (None: the mosaic itself).
    groups : sequence of str
        The groups the run writes (``labels/<name>`` first, then ``probs``, ...).
    overwrite, resume : bool
        The run's flags.

    Returns
    -------
    OutputCheck

    Raises
    ------
    ForeignOutputError
        The output lies inside a store (the input's ``labels`` or level 0, another
        mosaic) or contains the input; it is a store ``segment`` did not create; a
        group to write is not segment's; ``--resume`` of a copy made from another
        input; ``--overwrite`` of a copy holding data segment did not write.
    UnsafePathError
        An existing copy of another input without ``--overwrite``, or an unfinished
        copy without ``--overwrite``/``--resume``.
    """
    src = mosaic.path.resolve()
    raw = Path(output).expanduser() if output is not None else src
    out = raw.resolve()
    if _same(out, src):
        _check_groups(src, groups, mosaic, "")
        return OutputCheck(src, "input")
    where = f" --output {raw}"
    fix_new = f"write into the mosaic itself (semdask segment {src}), or choose a new --output"
    if _inside(out, src):
        raise _refuse(f"output {out}", expected=f"a store outside the input mosaic {src}",
                      got="a path inside it (writing there would replace its image or labels)",
                      fix=fix_new)
    if _inside(src, out):
        raise _refuse(f"output {out}", expected="a store that does not contain the input",
                      got=f"a directory holding the input mosaic {src}", fix=fix_new)
    outer = _enclosing_store(out)
    if outer is not None:
        raise _refuse(f"output {out}", expected="a store of its own",
                      got=f"a path inside the Zarr store {outer}", fix=fix_new)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return OutputCheck(out, "new")
    if not is_store(out):
        raise _refuse(f"output {out}", expected="a new path or a store written by semdask "
                      "segment", got="an existing file or a directory that is not a Zarr store",
                      fix="choose a new --output (semdask never deletes it)")
    sem = _root_semdask(out)
    mine = _copy_of(sem, mosaic, out)
    if mine is None:
        raise _refuse(f"output {out}", expected="a new store or a copy written by semdask "
                      f"segment from {src}",
                      got="a store semdask segment did not create (a mosaic, or another tool's "
                      "store): --overwrite and --resume never delete or write into it",
                      fix=f"choose a new --output, or segment that mosaic into its own labels: "
                      f"semdask segment {out}")
    if mine:
        _check_groups(out, groups, mosaic, where)
        if _image_ready(out, mosaic):
            return OutputCheck(out, "copy", reuse_image=True)
        if not (overwrite or resume):
            raise UnsafePathError(f"output {out}", expected="a new path",
                                  got="an unfinished copy of this mosaic",
                                  fix=f"semdask segment {src}{where} --resume")
        _check_replaceable(out, src, where)
        return OutputCheck(out, "replace")
    origin = sem.get("source", "another mosaic")
    if resume and not overwrite:
        raise _refuse(f"output {out}", expected=f"a copy written by semdask segment from {src}",
                      got=f"a copy written from another input ({origin}, other content): "
                      "--resume continues only a store's own run",
                      fix=f"replace it: semdask segment {src}{where} --overwrite, or choose a "
                      "new --output")
    if not overwrite:
        raise UnsafePathError(f"output {out}", expected="a new path",
                              got=f"an output of semdask segment from another input ({origin})",
                              fix=f"replace it: semdask segment {src}{where} --overwrite")
    _check_replaceable(out, src, where)
    return OutputCheck(out, "replace")


def _check_replaceable(out: Path, src: Path, where: str) -> None:
    bad = foreign_nodes(out)
    if bad:
        raise _refuse(f"output {out}", expected="a store holding only outputs of semdask segment",
                      got=f"data it did not write: {', '.join(bad)}",
                      fix=f"choose a new --output, or move those away first and rerun "
                      f"semdask segment {src}{where} --overwrite")

