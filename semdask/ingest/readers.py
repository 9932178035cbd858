"""File readers for :mod:`semdask.ingest.convert`: SEM images as lazy 2-D (y, x) arrays.

An :class:`ImageFile` describes one single-plane image on disk (TIFF/BigTIFF, PNG,
JPEG, BMP) and reads any rectangle of it. Tiled and striped TIFFs are read lazily:
a region read decodes only the TIFF tiles (or strips) that overlap it, and
uncompressed TIFFs are memory-mapped. Other formats are decoded whole (they
cannot be read in parts), so keep large mosaics in tiled TIFF.

RGB(A) images whose colour channels are equal are read as grey (logged once);
different channels raise :class:`~semdask.errors.InputError`. Only 8-bit,
16-bit and float32 data are accepted.

The pixel size and the data-bar height come from the vendor's own metadata
(FEI/Thermo Fisher, Zeiss, TESCAN tags; Hitachi/JEOL sidecar ``.txt`` files;
OME-TIFF and ImageJ/Fiji calibration): see :mod:`semdask.ingest.vendors`. The
generic TIFF XResolution tag is ignored: SEM software often fills it with a screen
resolution. Palette (indexed) TIFFs with a grey colour map, as Zeiss SmartSEM
writes, are read through their colour map.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from semdask.errors import InputError, UnsafePathError
from semdask.ingest.vendors import Calibration, calibrate

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFile",
    "open_image",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
_TIFF = (".tif", ".tiff")
_DTYPES = ("uint8", "uint16", "float32")
_REEXPORT = "re-export the image from the instrument software (or check the copy)"


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
        From the file's metadata (None: unknown).
    vendor : str or None
        Vendor (or tool) whose metadata gave the pixel size.
    pixel_size_from : str or None
        The metadata field(s) it came from (see :mod:`semdask.ingest.vendors`).
    databar_rows : int or None
        Data-bar rows the metadata declares at the bottom of the full image.
    databar_from : str or None
        The metadata field(s) that declared them.
    cropped_rows : int
        Rows dropped at the bottom by :meth:`cropped`.
    crop_from : str or None
        Why they were dropped (``"argument"``, ``"detected"`` or a metadata field).
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
    pixel_size_from: str | None = None
    databar_rows: int | None = None
    databar_from: str | None = None
    cropped_rows: int = 0
    crop_from: str | None = None
    _pixels: np.ndarray | None = field(default=None, repr=False, compare=False)
    _lut: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def ndim(self) -> int:
        """Always 2 (array-like protocol for :func:`dask.array.from_array`)."""
        return 2

    def cropped(self, rows: int, source: str | None = "argument") -> ImageFile:
        """The same file with ``rows`` more rows dropped at the bottom (a data bar)."""
        if not 0 <= rows < self.shape[0]:
            raise InputError(
                "crop_databar", expected=f"0 <= rows < {self.shape[0]}", got=repr(rows),
                fix=f"pass fewer rows, e.g. --crop-databar {max(self.shape[0] // 10, 1)}, "
                "or --crop-databar auto",
            )
        return dataclasses.replace(self, shape=(self.shape[0] - rows, self.shape[1]),
                                   cropped_rows=self.cropped_rows + rows,
                                   crop_from=source if rows else self.crop_from)

    def with_calibration(self, cal: Calibration) -> ImageFile:
        """The same file with the pixel size and data bar of ``cal``."""
        return dataclasses.replace(
            self, pixel_size_um=cal.pixel_size_um, vendor=cal.vendor,
            pixel_size_from=cal.source, databar_rows=cal.databar_rows,
            databar_from=cal.databar_source)

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
        grey = _to_grey(block, self.path)
        return grey if self._lut is None else self._lut[grey]

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
        try:
            cal = calibrate(tif, path, (h, w), pindex)
        except Exception as e:  # malformed vendor metadata must not hide the pixels
            log.warning("%s: unreadable metadata (%s): pixel size unknown", path, e)
            cal = Calibration()
        info = ImageFile(
            path=path, shape=(h, w), dtype=dtype, fmt="tiff", channels=planes * contig,
            page=pindex, segment=segment, memmappable=bool(p.is_memmappable),
            _lut=_palette_lut(p, path),
        ).with_calibration(cal)
    return info


def _palette_lut(p: tifffile.TiffPage, path: Path) -> np.ndarray | None:
    """Grey look-up table of an indexed (palette) page; None when it is the identity."""
    if p.photometric != tifffile.PHOTOMETRIC.PALETTE or p.colormap is None:
        return None
    cmap = np.asarray(p.colormap)
    if cmap.ndim != 2 or cmap.shape[0] != 3 or not (
        np.array_equal(cmap[0], cmap[1]) and np.array_equal(cmap[0], cmap[2])
    ):
        raise InputError(
            f"{path}", expected="a grey SEM image (a palette image needs a grey colour map)",
            got="a colour palette",
            fix="export the detector signal as a grey image, e.g. "
            "tifffile.imwrite(out, image) from the indexed pixels mapped to grey",
        )
    grey = cmap[0].astype(np.uint32)
    lut = (grey >> 8).astype(np.uint8) if p.dtype == np.uint8 else grey.astype(np.uint16)
    ramp = np.arange(lut.size)
    return None if np.array_equal(lut, ramp.astype(lut.dtype)) and lut.size <= 65536 else lut


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
    ).with_calibration(calibrate(None, path, (grey.shape[0], grey.shape[1])))


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
