"""Label images for :mod:`semdask.ingest.convert`: read, match by stem, check, count.

A label image holds class indices (uint8; a palette PNG's indices are used, not its
colours) with 255 kept as "ignore" (unlabelled). Every check runs before anything
is written: the label image has the image's shape (or, with a cropped data bar, the
uncropped shape: the same rows are cropped), no value above 255, and every value
other than 255 names a class.

Examples
--------
>>> import json, pathlib, tempfile
>>> p = pathlib.Path(tempfile.mkdtemp()) / "meta.json"
>>> _ = p.write_text(json.dumps({"classes": ["matrix", "precipitate"]}))
>>> read_classes(p)
['matrix', 'precipitate']
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semdask.errors import InputError, UnsafePathError
from semdask.ingest.readers import IMAGE_SUFFIXES, ImageFile, open_image

__all__ = [
    "IGNORE",
    "LabelledImage",
    "match_labels",
    "open_item",
    "open_label_image",
    "read_classes",
    "resolve_classes",
]

PathLike = str | os.PathLike[str]
IGNORE = 255  # label value kept as "unlabelled"


def read_classes(path: PathLike) -> list[str]:
    """Class names (index = label value) from a JSON or text file.

    JSON: a list of names, or an object with a ``"classes"`` list (e.g. a dataset's
    ``meta.json``); any other file: one name per line (blank lines skipped).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UnsafePathError(f"{p}", expected="a classes file (JSON or one name per line)",
                              got="nothing at that path", fix="check --classes-from")
    fix = 'write ["name0", "name1", ...] or {"classes": [...]} (JSON), or one name per line'
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise InputError(f"{p}", expected="valid JSON", got=str(e), fix=fix) from None
        names = data.get("classes") if isinstance(data, dict) else data
    else:
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise InputError(f"{p}", expected="a non-empty list of class names",
                         got=repr(names)[:80], fix=fix)
    return list(names)


@dataclass(frozen=True)
class LabelledImage:
    """One image to convert, with its (checked) label image and label-value counts.

    Attributes
    ----------
    image : ImageFile
        The SEM image (after any data-bar crop).
    rows : int
        Data-bar rows cropped.
    label : ImageFile or None
        Its label image, cropped alike.
    counts : numpy.ndarray or None
        Pixels per label value 0..255 (int64, length 256).
    """

    image: ImageFile
    rows: int
    label: ImageFile | None = None
    counts: np.ndarray | None = None


def open_label_image(path: Path) -> ImageFile:
    """A label image; palette PNGs give their indices (not the palette's colours)."""
    if path.is_file() and path.suffix.lower() not in (".tif", ".tiff"):
        from PIL import Image

        try:
            with Image.open(path) as im:
                idx = np.asarray(im) if im.mode == "P" else None
        except Exception as e:
            raise InputError(f"could not read {path}", got=str(e),
                             fix="save the labels as an 8-bit grey PNG or TIFF") from e
        if idx is not None:
            return ImageFile(path=path, shape=(idx.shape[0], idx.shape[1]), dtype=idx.dtype,
                             fmt="png", segment=idx.shape, _pixels=idx)
    lab = open_image(path)
    if lab.dtype.kind not in "ui":
        raise InputError(f"labels {path}", expected="integer class indices (uint8)",
                         got=f"{lab.dtype} pixels", fix="save the labels as 8-bit grey")
    return lab


def open_item(file: Path, crop_image: Callable[[ImageFile], tuple[ImageFile, int]],
              label_file: Path | None, edge: int, page: int | None = None) -> LabelledImage:
    """Open an image (cropped by ``crop_image``) and check and count its label image.

    The label image is read in ``edge``-px blocks; InputError on a shape mismatch or
    a value above 255.
    """
    img, rows = crop_image(open_image(file, page=page))
    if label_file is None:
        return LabelledImage(img, rows)
    lab = open_label_image(label_file)
    if rows and lab.shape == (img.shape[0] + rows, img.shape[1]):
        lab = lab.cropped(rows)  # labels drawn on the uncropped image
    if lab.shape != img.shape:
        raise InputError(f"labels {label_file}", expected=f"the image's shape {img.shape} "
                         f"({file.name})", got=f"shape {lab.shape}",
                         fix="pass the label image made for this image (same size)")
    counts = np.zeros(256, np.int64)
    h, w = lab.shape
    for y0 in range(0, h, edge):
        for x0 in range(0, w, edge):
            b = lab.read(y0, min(y0 + edge, h), x0, min(x0 + edge, w)).ravel()
            if b.size and int(b.max()) > IGNORE:
                raise InputError(f"labels {label_file}", expected="class indices 0..254 "
                                 f"(and {IGNORE} = ignore)", got=f"value {int(b.max())}",
                                 fix="map the classes to 0..n-1 and unlabelled pixels to 255")
            counts += np.bincount(b, minlength=256)[:256]
    return LabelledImage(img, rows, lab, counts)


def resolve_classes(items: Sequence[LabelledImage],
                    classes: Sequence[str] | None) -> list[str] | None:
    """Class names for the label images; every non-ignore value must name a class."""
    labelled = [it for it in items if it.counts is not None]
    if not labelled:
        return None
    seen = np.zeros(256, np.int64)
    for it in labelled:
        assert it.counts is not None
        seen += it.counts
    seen[IGNORE] = 0
    top = int(np.flatnonzero(seen).max()) if seen.any() else 0
    if classes is None:
        return [f"class {i}" for i in range(top + 1)]
    cls = [str(c).strip() for c in classes]
    if not cls or not all(cls) or len(cls) >= IGNORE:
        raise InputError("classes", expected=f"1 to {IGNORE - 1} non-empty names",
                         got=repr(list(classes)), fix="e.g. --classes pore,Ni,YSZ")
    for it in labelled:
        assert it.counts is not None and it.label is not None
        bad = [v for v in np.flatnonzero(it.counts) if len(cls) <= v != IGNORE]
        if bad:
            raise InputError(f"labels {it.label.path}", expected=f"values 0..{len(cls) - 1} "
                             f"({len(cls)} classes) or {IGNORE} (ignore)",
                             got=f"values {[int(v) for v in bad[:8]]}",
                             fix="give every class a name (--classes a,b,c / --classes-from "
                             "meta.json) or map unlabelled pixels to 255")
    return cls


def match_labels(files: Sequence[Path], labels: Path) -> list[Path]:
    """The label image of every input, matched by file stem in the folder ``labels``."""
    if not labels.is_dir():
        raise UnsafePathError(f"{labels}", expected="a folder of label images (by file stem) "
                              "for several inputs", got="a file" if labels.exists() else
                              "nothing at that path", fix="pass the labels folder to --labels")
    by_stem: dict[str, Path] = {}
    for q in sorted(labels.iterdir()):
        if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(q.stem, q)
    missing = [f.name for f in files if f.stem not in by_stem]
    if missing:
        raise InputError(f"labels folder {labels}", expected="a label image per input "
                         "(same file stem)", got=f"none for {missing[:5]}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""),
                         fix="add the missing label images or leave those inputs out")
    return [by_stem[f.stem] for f in files]
