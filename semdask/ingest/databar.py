"""Instrument data bars: crop the rows the metadata declares, detect them as a fallback.

Vendors draw a data bar (magnification, scale bar, detector...) below the image. It
is not sample and must not be segmented. :func:`crop_databar` removes it from what
the file's metadata declares first (FEI ``[PrivateFei] DatabarHeight``, JEOL/Hitachi
image size: see :mod:`semdask.ingest.vendors`); :func:`databar_rows` detects it
from the pixels only where the metadata says nothing (Zeiss, TESCAN, plain exports).

Examples
--------
>>> import numpy as np
>>> img = np.random.default_rng(0).integers(60, 200, (100, 50)).astype(np.uint8)
>>> img[90:] = 0; img[90] = 255; img[94:96, 5:20] = 255   # white rule, black bar, "text"
>>> databar_rows(img)
10
"""

from __future__ import annotations

import logging

import numpy as np

from semdask.errors import InputError
from semdask.ingest.readers import ImageFile

__all__ = ["crop_databar", "databar_rows"]

log = logging.getLogger(__name__)

_BAR_SEARCH = 2048  # rows at most searched for a data bar
_HINT_PIXELS = 64 << 20  # undeclared bars are looked for (to warn) in images up to this size
_INSTRUMENTS = ("FEI/Thermo Fisher", "Zeiss", "TESCAN", "Hitachi", "JEOL")  # burn bars in


def _row_stats(band: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: share of the 4 commonest values, share of the commonest, that value."""
    n, w = band.shape
    top4, top1, dom = np.zeros(n), np.zeros(n), np.zeros(n)
    for i, row in enumerate(band):
        values, counts = np.unique(row, return_counts=True)
        order = np.argsort(counts)[::-1]
        top4[i] = counts[order[:4]].sum() / w
        top1[i] = counts[order[0]] / w
        dom[i] = values[order[0]]
    return top4, top1, dom


def _flat_run(flat: np.ndarray, dom: np.ndarray, start: int, end: int) -> int:
    """First row after ``start`` that is not flat at ``start``'s value (``end + 1`` at most)."""
    j = start
    while j <= end and flat[j] and dom[j] == dom[start]:
        j += 1
    return j


def databar_rows(image: np.ndarray, *, max_fraction: float = 0.3, min_rows: int = 4) -> int:
    """Height of an instrument data bar at the bottom of ``image`` (0 if none is found).

    The fallback for files whose metadata does not declare the bar. A data bar is
    drawn, not imaged: its rows are *graphic* (90 % of the pixels take one of 4
    values: background, text, rules), while SEM rows carry noise. The bar is the run
    of graphic rows from the bottom (up to 2 odd rows at the very bottom are
    tolerated: Zeiss writes one image row below its bar). If that run starts with a
    flat block thicker than a rule (more than ``max(2, height // 400)`` rows) that
    sits on a thin rule of another value, the block is saturated image (e.g. black
    pores above FEI's white rule) and the bar starts at the rule. A run that reaches
    ``max_fraction`` of the height is an image with few grey levels, not a bar: 0.
    Conservative by design; bars shorter than ``min_rows`` are ignored.
    """
    h = image.shape[0]
    n = min(int(h * max_fraction), h)
    if n < min_rows or image.ndim != 2 or image.shape[1] == 0:
        return 0
    band = np.asarray(image[h - n :])
    step = -(-band.shape[1] // 4096)  # statistics only: subsample very wide images
    top4, top1, dom = _row_stats(band[:, ::step])
    graphic, flat = top4 >= 0.9, top1 >= 0.95
    i, skipped = n - 1, 0
    while i >= 0 and not graphic[i] and skipped < 2:
        i, skipped = i - 1, skipped + 1
    if i < 0 or not graphic[i]:
        return 0
    end = i
    while i >= 0 and graphic[i]:
        i -= 1
    top, rule = i + 1, max(2, h // 400)  # thickest line taken for a drawn rule
    j = _flat_run(flat, dom, top, end)
    if flat[top] and j > end:
        return 0  # flat to the bottom: nothing drawn
    if flat[top] and j - top > rule and flat[j] and dom[j] != dom[top] \
            and _flat_run(flat, dom, j, end) - j <= rule:
        top = j  # saturated image rows above a thin rule: the bar starts at the rule
    elif top == 0:
        return 0
    rows = n - top
    return rows if min_rows <= rows < n else 0


def _detect(img: ImageFile) -> int:
    h = img.shape[0]
    n = min(h, _BAR_SEARCH * 10 // 3)
    rows = databar_rows(img.read(h - n, h, 0, img.shape[1])) if n else 0
    return min(rows, h - 1)


def crop_databar(img: ImageFile, crop: bool | int | None) -> tuple[ImageFile, int]:
    """Drop the data bar: declared by metadata first, detected only as a fallback.

    Parameters
    ----------
    img : ImageFile
        The image, with the data bar its metadata declares (if any).
    crop : bool, int or None
        ``None`` (default): crop the declared bar; with none declared, crop a detected
        bar in an instrument export (a file with vendor metadata: Zeiss and TESCAN
        do not declare their bar) and only warn about one in any other image.
        ``True`` (``--crop-databar auto``): declared, else detected, in any image.
        An int: that many rows (0: none). ``False``: nothing.

    Returns
    -------
    tuple of (ImageFile, int)
        The cropped image (``crop_from`` says why) and the rows dropped.
    """
    declared = img.databar_rows
    if crop is None or crop is True:
        if declared is not None:
            rows = min(declared, img.shape[0] - 1)
            log.info("%s: %d data-bar rows cropped (%s)", img.path, rows, img.databar_from)
            return img.cropped(rows, img.databar_from), rows
        instrument = img.vendor in _INSTRUMENTS
        look = crop is True or instrument or img.shape[0] * img.shape[1] <= _HINT_PIXELS
        rows = _detect(img) if look else 0
        if crop is None and not instrument:
            if rows:
                log.warning("%s: the bottom %d rows look like an instrument data bar: pass "
                            "--crop-databar auto (crop_databar=True) to remove it, or "
                            "--crop-databar 0 to keep it", img.path, rows)
            return img, 0
        if crop is None and rows:
            log.warning("%s: %d data-bar rows detected and cropped (%s does not record the bar "
                        "height); pass --crop-databar 0 to keep them or --crop-databar ROWS "
                        "to set it", img.path, rows, img.vendor)
        else:
            log.info("%s: data bar %s", img.path,
                     f"of {rows} rows detected and cropped" if rows else "not found")
        return img.cropped(rows, "detected"), rows
    if crop is False:
        return img, 0
    if isinstance(crop, int) and crop >= 0:
        if declared is not None and declared != crop:
            log.warning("%s: cropping %d rows as asked, but %s says the data bar has %d",
                        img.path, crop, img.databar_from, declared)
        log.info("%s: %d data-bar rows cropped", img.path, crop)
        return img.cropped(crop, "argument"), crop
    raise InputError("crop_databar", expected="None (metadata), True (auto), False or a "
                     "number of rows >= 0", got=repr(crop),
                     fix="--crop-databar auto, or --crop-databar 30 to drop 30 rows")
