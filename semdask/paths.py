"""User path validation: inputs must exist, outputs never clobber what is not a store.

Examples
--------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> validate_output_path(d / "new.ome.zarr", overwrite=False).name
'new.ome.zarr'
>>> validate_input_path(d / "missing.tif")
Traceback (most recent call last):
...
semdask.errors.UnsafePathError: input .../missing.tif: expected an existing path, got nothing...
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

from semdask.errors import UnsafePathError

__all__ = ["is_store", "validate_input_path", "validate_output_path"]

log = logging.getLogger(__name__)
PathLike = str | Path


def validate_input_path(path: PathLike, *, kind: Literal["any", "file", "dir"] = "any") -> Path:
    """Return the resolved (symlink-free) path of an existing input.

    Raises
    ------
    UnsafePathError
        When nothing is there, a symlink is broken, or it is a file/directory
        where the other is needed.
    """
    p = Path(path).expanduser()
    if not p.exists():
        got = f"a broken symlink to {p.readlink()}" if p.is_symlink() else "nothing there"
        raise UnsafePathError(f"input {p}", expected="an existing path", got=got,
                              fix="check the spelling and the working directory")
    p = p.resolve(strict=True)
    if kind == "file" and not p.is_file():
        raise UnsafePathError(f"input {p}", expected="a file", got="a directory",
                              fix="pass the image file itself")
    if kind == "dir" and not p.is_dir():
        raise UnsafePathError(f"input {p}", expected="a directory (e.g. an .ome.zarr store)",
                              got="a file")
    return p


def is_store(p: Path) -> bool:
    return p.is_dir() and any((p / f).is_file() for f in ("zarr.json", ".zgroup", ".zattrs"))


def validate_output_path(
    path: PathLike, *, overwrite: bool, input_path: PathLike | None = None
) -> Path:
    """Check an output store path, remove an old store when ``overwrite``, create parents.

    Only a directory that looks like a Zarr store (``zarr.json``/``.zgroup``) is ever
    deleted; an empty directory is reused; anything else is refused.

    Raises
    ------
    UnsafePathError
        When the output exists (and ``overwrite`` is False), is a file, a symlink or
        a non-store directory, or equals / contains / lies inside ``input_path``.
    """
    raw = Path(path).expanduser()
    p = raw.resolve()
    if input_path is not None:
        inp = Path(input_path).expanduser().resolve()
        if p == inp or p.is_relative_to(inp) or inp.is_relative_to(p):
            raise UnsafePathError(f"output {p}", expected="a path outside the input",
                                  got=f"a path overlapping the input {inp}",
                                  fix="choose a different output path")
    if raw.is_symlink():
        raise UnsafePathError(f"output {raw}", expected="a new path", got="a symlink",
                              fix="remove the symlink or choose another output path")
    if p.exists():
        if not p.is_dir():
            raise UnsafePathError(f"output {p}", expected="a new directory path",
                                  got="an existing file", fix="choose another output path")
        if any(p.iterdir()):
            if not is_store(p):
                raise UnsafePathError(
                    f"output {p}", expected="a new path or an existing Zarr store",
                    got="a non-empty directory that is not a Zarr store",
                    fix="choose another output path (semdask never deletes other directories)")
            if not overwrite:
                raise UnsafePathError(f"output {p}", expected="a new path",
                                      got="an existing Zarr store",
                                      fix="pass overwrite=True (--overwrite) to replace it")
            log.info("removing existing store %s", p)
            shutil.rmtree(p)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UnsafePathError(f"output {p}", expected="a creatable parent directory",
                              got=f"{type(e).__name__}: {e.strerror}") from e
    return p
