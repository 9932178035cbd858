"""File readers for :mod:`semdask.convert`: SEM images as lazy 2-D (y, x) arrays.

An :class:`ImageFile` describes one single-plane image on disk (TIFF/BigTIFF, PNG,
JPEG, BMP) and reads any rectangle of it. Tiled and striped TIFFs are read lazily:
a region read decodes only the TIFF tiles (or strips) that overlap it, and
uncompressed TIFFs are memory-mapped. Other formats are decoded whole (they
cannot be read in parts), so keep large mosaics in tiled TIFF.

RGB(A) images whose colour channels are equal are read as grey (logged once);
different channels raise :class:`~semdask.errors.InputError`. Only 8-bit,
16-bit and float32 data are accepted.

The pixel size comes only from vendor tags, which are trusted:
FEI/Thermo Fisher (tags 34680/34682, ``[Scan] PixelWidth`` in metres), Zeiss
SmartSEM (tag 34118 ``CZ_SEM``, ``ap_image_pixel_size`` with a unit) and TESCAN
(tag 50431, ``PixelSizeX=`` in metres). The generic TIFF XResolution tag is
ignored: SEM software often fills it with a screen resolution.

Examples
--------
>>> unit_to_um(44.58, "nm")
0.04458
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from semdask.errors import InputError, UnsafePathError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFile",
    "open_image",
    "unit_to_um",
    "vendor_pixel_size",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
_TIFF = (".tif", ".tiff")
_DTYPES = ("uint8", "uint16", "float32")
_UNITS_UM = {"pm": 1e-6, "nm": 1e-3, "um": 1.0, "µm": 1.0, "μm": 1.0, "mm": 1e3, "m": 1e6}
_PLAUSIBLE_UM = (1e-5, 1e3)  # 10 fm .. 1 mm per pixel
_REEXPORT = "re-export the image from the instrument software (or check the copy)"


def unit_to_um(value: float, unit: str) -> float:
    """Convert a length ``value`` in ``unit`` (pm, nm, um/µm, mm, m) to micrometres."""
    factor = _UNITS_UM.get(unit.strip())
    if factor is None:
        raise InputError("pixel size unit", expected=f"one of {sorted(_UNITS_UM)}", got=repr(unit))
    return round(float(value) * factor, 12)


def _plausible(um: float | None, source: str) -> float | None:
    if um is None or not math.isfinite(um) or not _PLAUSIBLE_UM[0] <= um <= _PLAUSIBLE_UM[1]:
        if um is not None:
            log.warning("ignoring implausible pixel size %r um from %s", um, source)
        return None
    return um


def vendor_pixel_size(tif: tifffile.TiffFile) -> tuple[float | None, str | None]:
    """Pixel size (um) and vendor name from vendor TIFF tags, ``(None, None)`` if absent."""
    fei = tif.fei_metadata
    if fei:
        for section in ("Scan", "EScan", "Image"):
            value = fei.get(section, {}).get("PixelWidth")
            if isinstance(value, int | float) and value > 0:
                return _plausible(value * 1e6, "FEI [Scan] PixelWidth"), "FEI/Thermo Fisher"
    sem = tif.sem_metadata
    if sem:
        entry = sem.get("ap_image_pixel_size") or sem.get("ap_pixel_size")
        if isinstance(entry, tuple) and len(entry) >= 2:
            value, unit = entry[1], (entry[2] if len(entry) > 2 else "")
            if isinstance(value, str):  # e.g. "44.58nm" that tifffile did not split
                m = re.match(r"\s*([0-9.eE+-]+)\s*(\S*)", value)
                value, unit = (float(m.group(1)), m.group(2) or unit) if m else (None, unit)
            if isinstance(value, int | float) and unit:
                return _plausible(unit_to_um(value, unit), "Zeiss CZ_SEM"), "Zeiss"
    tag = tif.pages.first.tags.get(50431)
    if tag is not None:
        raw = tag.value
        text = raw.decode("latin-1") if isinstance(raw, bytes | bytearray) else str(raw)
        m = re.search(r"PixelSizeX\s*=\s*([0-9.eE+-]+)", text)
        if m:
            return _plausible(float(m.group(1)) * 1e6, "TESCAN PixelSizeX"), "TESCAN"
    return None, None


def _read_error(path: Path, reason: object) -> InputError:
    return InputError(f"could not read {path}", got=str(reason), fix=_REEXPORT)


@dataclass(frozen=True)
class ImageFile:
    """One 2-D image on disk, read as grey ``(y, x)`` regions.

    Attributes
    ----------
    path : Path
        The file.
    shape : tuple of int
        ``(height, width)`` exposed (after any :meth:`cropped`).
    dtype : numpy.dtype
        uint8, uint16 or float32.
    fmt : str
        ``"tiff"`` or the Pillow format name (``"png"``, ...).
    channels : int
        Samples per pixel in the file (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).
    page : int
        TIFF page index (0 for other formats).
    segment : tuple of int
        Natural read unit ``(rows, cols)`` (TIFF tile or strip; the whole image otherwise).
    pixel_size_um : float or None
        From vendor tags (None when there are none).
    vendor : str or None
        Vendor whose tags gave the pixel size.
    """

    path: Path
    shape: tuple[int, int]
    dtype: np.dtype[Any]
    fmt: str
    channels: int = 1
    page: int = 0
    segment: tuple[int, int] = (0, 0)
    pixel_size_um: float | None = None
    vendor: str | None = None
    memmappable: bool = False
    _pixels: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ndim(self) -> int:
        """Always 2 (array-like protocol for :func:`dask.array.from_array`)."""
        return 2

    def cropped(self, rows: int) -> ImageFile:
        """The same file with ``rows`` rows dropped at the bottom (a data bar)."""
        if not 0 <= rows < self.shape[0]:
            raise InputError(
                "crop_databar", expected=f"0 <= rows < {self.shape[0]}", got=repr(rows)
            )
        return dataclasses.replace(self, shape=(self.shape[0] - rows, self.shape[1]))

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = (range(n)[k] for k, n in zip(key, self.shape, strict=True))
        assert ys.step == xs.step == 1
        return self.read(ys.start, ys.stop, xs.start, xs.stop)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Read rows ``y0:y1`` and columns ``x0:x1`` as a grey 2-D array."""
        h, w = self.shape
        if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
            raise InputError("region", expected=f"inside {self.shape}",
                             got=f"rows {y0}:{y1}, columns {x0}:{x1}")
        try:
            if self._pixels is not None:
                block = self._pixels[y0:y1, x0:x1]
            elif self.memmappable:
                mm = tifffile.memmap(self.path, page=self.page, mode="r")
                block = np.moveaxis(mm, 0, -1) if mm.ndim == 3 and self.channels == mm.shape[0] \
                    else mm
                block = np.array(block[y0:y1, x0:x1])
            else:
                block = self._read_segments(y0, y1, x0, x1)
        except InputError:
            raise
        except Exception as e:  # tifffile/imagecodecs raise many types on corrupt data
            raise _read_error(self.path, e) from e
        return _to_grey(block, self.path)

    def _read_segments(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Decode only the TIFF tiles/strips overlapping the region."""
        sh, sw = self.segment
        out = np.zeros((y1 - y0, x1 - x0, self.channels), self.dtype)
        if y1 == y0 or x1 == x0:
            return out
        with tifffile.TiffFile(self.path) as tif:
            page = tif.pages[self.page]
            assert isinstance(page, tifffile.TiffPage)
            planes, _, ph, pw, contig = page.shaped
            nty, ntx = -(-ph // sh), -(-pw // sw)
            ids = [
                p * nty * ntx + ty * ntx + tx
                for p in range(planes)
                for ty in range(y0 // sh, (y1 - 1) // sh + 1)
                for tx in range(x0 // sw, (x1 - 1) // sw + 1)
            ]
            kw: dict[str, Any] = {"_fullsize": True}
            if page.jpegtables is not None:
                kw["jpegtables"] = page.jpegtables
            if page.jpegheader is not None:
                kw["jpegheader"] = page.jpegheader
            offsets = [page.dataoffsets[i] for i in ids]
            counts = [page.databytecounts[i] for i in ids]
            for data, i in tif.filehandle.read_segments(offsets, counts, ids, sort=True):
                seg, idx, _ = page.decode(data, i, **kw)
                if seg is None:
                    continue  # sparse tile: stays zero
                gy, gx = idx[2], idx[3]
                c0 = idx[0] if planes > 1 else 0
                a, b = max(y0, gy), min(y1, gy + sh)
                c, d = max(x0, gx), min(x1, gx + sw)
                part = np.asarray(seg).reshape(sh, sw, contig)[a - gy : b - gy, c - gx : d - gx]
                out[a - y0 : b - y0, c - x0 : d - x0, c0 : c0 + contig] = part
        return out


def _to_grey(block: np.ndarray, path: Path) -> np.ndarray:
    if block.ndim == 2:
        return block
    if block.shape[-1] in (1, 2):  # grey (+ alpha)
        return np.ascontiguousarray(block[..., 0])
    rgb = block[..., :3]
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise InputError(
            f"{path}",
            expected="a grey SEM image (RGB is accepted only when R == G == B)",
            got="an RGB image with different colour channels",
            fix="export the detector signal as a grey image, or convert it first, e.g. "
            "skimage.color.rgb2gray, and save as 8/16-bit grey TIFF",
        )
    return np.ascontiguousarray(rgb[..., 0])


def _check_dtype(dtype: np.dtype[Any], path: Path) -> np.dtype[Any]:
    if dtype.name not in _DTYPES:
        raise InputError(
            f"{path}",
            expected=f"pixel type {', '.join(_DTYPES)}",
            got=dtype.name,
            fix="re-export as 8-bit or 16-bit grey, or convert with e.g. "
            "tifffile.imwrite(out, image.astype('uint16'))",
        )
    return dtype


def _stack_error(path: Path, got: str) -> InputError:
    return InputError(
        f"{path}",
        expected="a single 2-D image",
        got=got,
        fix="split the stack, or pass --page N (page=N) to convert one page",
    )


def _open_tiff(path: Path, page: int | None) -> ImageFile:
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:
        raise _read_error(path, e) from e
    with tif:
        try:
            pages = [
                (i, p) for i, p in enumerate(tif.pages) if not getattr(p, "is_reduced", False)
            ]
        except Exception as e:
            raise _read_error(path, e) from e
        if not pages:
            raise _read_error(path, "no image in the file (0 readable pages)")
        if page is None and len(pages) > 1:
            raise _stack_error(path, f"{len(pages)} pages of shape {pages[0][1].shape}")
        index = page or 0
        if not 0 <= index < len(pages):
            raise InputError("page", expected=f"0 <= page < {len(pages)}", got=repr(page))
        pindex, p = pages[index]
        if not isinstance(p, tifffile.TiffPage):
            p = p.aspage()
        planes, depth, h, w, contig = p.shaped
        if depth != 1 or planes * contig > 4 or (planes > 1 and contig > 1):
            raise _stack_error(path, f"a page of shape {p.shape}")
        dtype = _check_dtype(np.dtype(p.dtype), path)
        size = os.path.getsize(path)
        ends = [o + c for o, c in zip(p.dataoffsets, p.databytecounts, strict=True) if c]
        if ends and max(ends) > size:
            raise _read_error(path, f"truncated: image data ends at byte {max(ends)}, "
                                    f"the file has {size} bytes")
        tiled = p.is_tiled
        segment = (p.tilelength, p.tilewidth) if tiled else (min(p.rowsperstrip or h, h), w)
        um, vendor = vendor_pixel_size(tif)
        info = ImageFile(
            path=path, shape=(h, w), dtype=dtype, fmt="tiff", channels=planes * contig,
            page=pindex, segment=segment,
            pixel_size_um=um, vendor=vendor, memmappable=bool(p.is_memmappable),
        )
    return info


def _open_pillow(path: Path) -> ImageFile:
    from PIL import Image

    try:
        with Image.open(path) as im:
            fmt = (im.format or path.suffix.lstrip(".")).lower()
            frames = int(getattr(im, "n_frames", 1))
            if frames > 1:
                raise _stack_error(path, f"{frames} frames")
            mode = im.mode
            conv = im.convert("RGBA") if mode == "P" else im.convert("L") if mode == "1" else im
            arr = np.asarray(conv)
            if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
                arr = arr.astype(np.uint16)
    except InputError:
        raise
    except Exception as e:
        raise _read_error(path, e) from e
    arr = arr.astype(arr.dtype.newbyteorder("="))
    _check_dtype(arr.dtype, path)
    channels = 1 if arr.ndim == 2 else arr.shape[-1]
    grey = _to_grey(arr, path)
    return ImageFile(
        path=path, shape=(grey.shape[0], grey.shape[1]), dtype=grey.dtype, fmt=fmt,
        channels=channels, segment=grey.shape, _pixels=grey,
    )


def open_image(path: str | os.PathLike[str], *, page: int | None = None) -> ImageFile:
    """Open one image file and check that it is a single grey (or grey-as-RGB) 2-D image.

    Parameters
    ----------
    path : path-like
        TIFF/BigTIFF (read lazily per tile or strip), PNG, JPEG or BMP (read whole).
    page : int, optional
        TIFF page to read from a multi-page file (default: the file must have one page).

    Returns
    -------
    ImageFile

    Raises
    ------
    UnsafePathError
        If the path does not exist or is not a file.
    InputError
        For unreadable/corrupt files, stacks, RGB with different channels, other pixel types.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UnsafePathError(
            f"{p}", expected="an existing image file",
            got="a directory" if p.is_dir() else "nothing at that path",
            fix="check the path (and the working directory)",
        )
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"{p}", expected=f"an image file ({', '.join(IMAGE_SUFFIXES)})",
                         got=f"suffix {p.suffix!r}", fix="convert it to a tiled TIFF first")
    info = _open_tiff(p, page) if p.suffix.lower() in _TIFF else _open_pillow(p)
    if info.fmt == "tiff":
        h, w = info.shape
        info.read(0, min(h, info.segment[0]), 0, min(w, info.segment[1]))  # fail early
    if info.channels >= 3:
        log.warning("%s: RGB%s with equal channels, read as grey", p,
                    "A" if info.channels == 4 else "")
    return info
