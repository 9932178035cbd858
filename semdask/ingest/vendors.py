"""Pixel size and data bar from each vendor's own metadata conventions.

:func:`calibrate` reads every source of calibration in a file and returns one
:class:`Calibration`: the pixel size in µm (or ``None``: unknown, never a made-up
default), where it came from, and the height of the instrument's data bar when the
metadata declares it. Sources, in the order they are trusted:

==========  =====================================================================
FEI/Thermo  TIFF tags 34680/34682. ``[Scan]`` (``[EScan]``, ``[IScan]``) ``PixelWidth``
            in metres; without it ``HFW / [Image] ResolutionX`` from ``[EBeam]``,
            ``[IBeam]`` or ``[IRBeam]`` (navigation camera). Data bar:
            ``[PrivateFei] DatabarHeight``, else image height - ``[Image] ResolutionY``.
            (RosettaSciIO ``rsciio/tiff/_api.py`` ``_axes_fei``; tifffile ``fei_metadata``.)
Zeiss       TIFF tag 34118 ``CZ_SEM``. SmartSEM's pixel size (the unnamed record's
            4th value, metres, full precision; else ``ap_pixel_size``) refers to a
            1024-px wide display: image pixel = value * 1024 / image width
            (RosettaSciIO ``_axes_zeiss``; HyperSpy PR #2056/#2064).
            ``ap_image_pixel_size`` (already per image pixel, 4 digits) and
            ``ap_width / image width`` are used when that is absent, and cross-check
            it. No data-bar height is written: the bar is detected.
TESCAN      TIFF tag 50431 INI text, ``PixelSizeX=`` in metres.
Hitachi     sidecar ``<stem>.txt`` (``[SemImageFile]``), ``PixelSize=`` in nm; data bar
            = image height - ``DataSize=WxH`` height (ImageJ macro
            ``SEM_Hitachi_Scale.ijm``, EM-tool).
JEOL        sidecar ``<stem>.txt``: ``$$SM_MICRON_MARKER`` (e.g. ``5um``) over
            ``$$SM_MICRON_BAR`` (its length in px); data bar = image height -
            ``$CM_FULL_SIZE W H`` height (``JOEL_SEM_Scale.ijm``, EM-tool).
OME-TIFF    ``Pixels/@PhysicalSizeX`` with ``PhysicalSizeXUnit`` (default µm).
ImageJ      ``ImageJ=`` description with ``unit=`` and XResolution = px per unit
            (RosettaSciIO ``_add_axes_imagej``).
==========  =====================================================================

The generic TIFF XResolution of other files is ignored: SEM software fills it with a
screen resolution. When sources disagree by more than 2 % a warning names both and
the one used (the first above); an unknown unit is a warning and that source is skipped.

Examples
--------
>>> unit_to_um(44.58, "nm")
0.04458
>>> unit_to_um(2, "micron")
2.0
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tifffile

from semdask.errors import InputError

__all__ = ["Calibration", "calibrate", "sidecar_calibration", "unit_to_um"]

log = logging.getLogger(__name__)

_UM = {"pm": 1e-6, "\u00c5": 1e-4, "\u212b": 1e-4, "angstrom": 1e-4, "nm": 1e-3,
       "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
       "mm": 1e3, "cm": 1e4, "m": 1e6, "inch": 25400.0, "in": 25400.0}
_PLAUSIBLE_UM = (1e-5, 1e4)  # 10 fm .. 1 cm per pixel (navigation cameras reach ~300 µm)
_AGREE = 0.02  # relative tolerance between two sources (rounded vendor values)
_SIDECAR_MAX = 1 << 20  # bytes: a vendor .txt is a few kB
_ZEISS_DISPLAY = 1024  # SmartSEM pixel sizes refer to a 1024-px wide display


def unit_to_um(value: float, unit: str) -> float:
    """Convert a length ``value`` in ``unit`` (pm, Å, nm, um/µm/micron, mm, cm, m) to µm."""
    u = unit.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    factor = _UM.get(u, _UM.get(u.lower()))
    if factor is None:
        raise InputError("pixel size unit", expected=f"one of {sorted(_UM)}", got=repr(unit),
                         fix="pass the pixel size explicitly, e.g. --pixel-size 0.01 (µm)")
    return round(float(value) * factor, 12)


@dataclass(frozen=True)
class Calibration:
    """What a file's metadata says about its pixel size and data bar.

    Attributes
    ----------
    pixel_size_um : float or None
        Pixel size in µm; ``None`` when no source gave a usable one (unknown).
    vendor : str or None
        Vendor or tool of the source used (``"FEI/Thermo Fisher"``, ``"Zeiss"``, ...).
    source : str or None
        The metadata field(s) the pixel size came from.
    databar_rows : int or None
        Data-bar rows at the bottom declared by the metadata (``None``: not declared).
    databar_source : str or None
        The metadata field(s) the data-bar height came from.
    """

    pixel_size_um: float | None = None
    vendor: str | None = None
    source: str | None = None
    databar_rows: int | None = None
    databar_source: str | None = None


_Found = tuple[float, str, str]  # (um, vendor, source)


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _length(value: Any, unit: Any, source: str) -> float | None:
    """``value`` (a number, or ``"44.58 nm"``) in ``unit`` -> µm; None (with a warning) if bad."""
    if isinstance(value, str):
        m = re.match(r"\s*([0-9.]+(?:[eE][+-]?\d+)?)\s*(\S*)", value)
        if not m:
            return None
        value, unit = m.group(1), m.group(2) or unit
    v = _num(value)
    if v is None:
        return None
    try:
        return unit_to_um(v, str(unit or ""))
    except InputError:
        log.warning("%s: unknown length unit %r, this source is ignored", source, unit)
        return None


def _fei(fei: dict[str, Any], w: int, h: int) -> tuple[list[_Found], int | None, str | None]:
    vendor, found = "FEI/Thermo Fisher", []
    image = fei.get("Image", {}) or {}
    resx, resy = _num(image.get("ResolutionX")), _num(image.get("ResolutionY"))
    for sec in ("Scan", "EScan", "IScan"):
        pw = _num((fei.get(sec) or {}).get("PixelWidth"))
        if pw is not None:
            found.append((pw * 1e6, vendor, f"FEI [{sec}] PixelWidth"))
            ph = _num((fei.get(sec) or {}).get("PixelHeight"))
            if ph is not None and abs(ph - pw) > _AGREE * pw:
                log.warning("FEI [%s]: PixelHeight %g m differs from PixelWidth %g m "
                            "(non-square pixels): PixelWidth is used", sec, ph, pw)
            break
    for beam in ("EBeam", "IBeam", "IRBeam"):
        hfw = _num((fei.get(beam) or {}).get("HFW"))
        if hfw is not None and resx is not None:
            found.append((hfw / resx * 1e6, vendor, f"FEI [{beam}] HFW / [Image] ResolutionX"))
    if found and resx is not None and int(resx) != w:
        log.warning("FEI [Image] ResolutionX is %d px but the image is %d px wide (resampled "
                    "or cropped after acquisition?): the pixel size refers to the scan; pass "
                    "--pixel-size UM if the image was resampled", int(resx), w)
    bar, bar_src = None, None
    private = fei.get("PrivateFei", {}) or {}
    declared = private.get("DatabarHeight")
    from_res = h - int(resy) if resy is not None and int(resy) < h else None
    if isinstance(declared, int | float) and declared >= 0:
        bar, bar_src = int(declared), "FEI [PrivateFei] DatabarHeight"
        if from_res is not None and from_res != bar:
            log.warning("FEI DatabarHeight %d rows but image height %d - ResolutionY %d = %d: "
                        "DatabarHeight is used", bar, h, int(resy or 0), from_res)
    elif from_res is not None:
        bar, bar_src = from_res, "FEI image height - [Image] ResolutionY"
    return found, bar, bar_src


def _zeiss(sem: dict[str, Any], w: int) -> list[_Found]:
    vendor, found = "Zeiss", []
    scale = _ZEISS_DISPLAY / w
    raw = sem.get("")
    display = _num(raw[3]) if isinstance(raw, tuple) and len(raw) > 3 else None
    if display is not None:
        found.append((display * 1e6 * scale, vendor,
                      "Zeiss CZ_SEM pixel size (1024-px display) x 1024 / image width"))

    def entry(key: str) -> float | None:
        e = sem.get(key)
        if isinstance(e, tuple) and len(e) >= 2:
            return _length(e[1], e[2] if len(e) > 2 else "", f"Zeiss {key}")
        return None

    display_tag = entry("ap_pixel_size")
    if display is not None and display_tag is not None and \
            abs(display * 1e6 - display_tag) > _AGREE * display_tag:
        log.warning("Zeiss CZ_SEM: the unnamed record's pixel size %g m is not ap_pixel_size "
                    "(%g µm): record layout not recognised, ap_pixel_size is used instead",
                    display, display_tag)
        found.pop(0)
        display = None
    image_px = entry("ap_image_pixel_size")
    if image_px is not None:
        found.append((image_px, vendor, "Zeiss CZ_SEM ap_image_pixel_size"))
    if display is None and display_tag is not None:
        found.insert(0, (display_tag * scale, vendor,
                         "Zeiss CZ_SEM ap_pixel_size (1024-px display) x 1024 / image width"))
    field = entry("ap_width")
    if field is not None:
        found.append((field / w, vendor, "Zeiss CZ_SEM ap_width / image width"))
    store = sem.get("dp_image_store")
    text = str(store[1]) if isinstance(store, tuple) and len(store) > 1 else ""
    m = re.match(r"\s*(\d+)\s*\*\s*(\d+)", text)
    if m and int(m.group(1)) != w:
        log.warning("Zeiss store resolution %s but the image is %d px wide (resampled or "
                    "cropped?): pixel size scaled to the image width; pass --pixel-size UM "
                    "if it was cropped", text, w)
    return found


def _tescan(raw: Any) -> list[_Found]:
    text = raw.decode("latin-1") if isinstance(raw, bytes | bytearray) else str(raw)
    m = re.search(r"PixelSizeX\s*=\s*([0-9.eE+-]+)", text)
    v = _num(m.group(1)) if m else None
    return [(v * 1e6, "TESCAN", "TESCAN PixelSizeX")] if v is not None else []


def _ome(tif: tifffile.TiffFile) -> list[_Found]:
    if not tif.is_ome or not tif.ome_metadata:
        return []
    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError as e:
        log.warning("unreadable OME-XML (%s): its physical size is ignored", e)
        return []
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels" and "PhysicalSizeX" in el.attrib:
            unit = el.attrib.get("PhysicalSizeXUnit", "µm")
            um = _length(el.attrib["PhysicalSizeX"], unit, "OME PhysicalSizeX")
            y = el.attrib.get("PhysicalSizeY")
            uy = _length(y, el.attrib.get("PhysicalSizeYUnit", "µm"), "OME PhysicalSizeY") \
                if y else None
            if um is not None and uy is not None and abs(uy - um) > _AGREE * um:
                log.warning("OME PhysicalSizeY %g µm differs from PhysicalSizeX %g µm "
                            "(non-square pixels): PhysicalSizeX is used", uy, um)
            return [(um, "OME-TIFF", "OME Pixels PhysicalSizeX")] if um is not None else []
    return []


def _imagej(tif: tifffile.TiffFile) -> list[_Found]:
    meta = tif.imagej_metadata if tif.is_imagej else None
    unit = (meta or {}).get("unit")
    tag = tif.pages.first.tags.get("XResolution")
    if not unit or tag is None or str(unit).lower() in ("pixel", "pixels", ""):
        return []
    num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
    per_unit = _num(num / den) if den else None
    if per_unit is None:
        return []
    um = _length(1.0 / per_unit, unit, "ImageJ calibration")
    return [(um, "ImageJ/Fiji", "ImageJ unit + XResolution")] if um is not None else []


def _read_sidecar(path: Path) -> str | None:
    for cand in (path.with_suffix(".txt"), path.with_suffix(".TXT")):
        try:
            if not cand.is_file() or cand.stat().st_size > _SIDECAR_MAX:
                continue
            raw = cand.read_bytes()
        except OSError:
            continue
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return raw.decode("utf-16", errors="replace")
        raw = raw.replace(b"\x00", b"")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("latin-1")
    return None


def sidecar_calibration(path: Path, shape: tuple[int, int]
                        ) -> tuple[list[_Found], int | None, str | None]:
    """Hitachi/JEOL ``<stem>.txt`` next to ``path``: pixel sizes and the declared data bar."""
    text = _read_sidecar(path)
    if text is None:
        return [], None, None
    h, w = shape
    found: list[_Found] = []
    size: tuple[int, int] | None = None
    if re.search(r"^\s*\$\$?(CM|SM)_", text, re.M):  # JEOL
        bar = re.search(r"^\s*\$\$SM_MICRON_BAR\s+([0-9.]+)", text, re.M)
        mark = re.search(r"^\s*\$\$SM_MICRON_MARKER\s+([0-9.]+)\s*(\S+)", text, re.M)
        if bar and mark and _num(bar.group(1)):
            um = _length(mark.group(1), mark.group(2), "JEOL $$SM_MICRON_MARKER")
            if um is not None:
                found.append((um / float(bar.group(1)), "JEOL",
                              "JEOL $$SM_MICRON_MARKER / $$SM_MICRON_BAR"))
        full = re.search(r"^\s*\$CM_FULL_SIZE\s+(\d+)\s+(\d+)", text, re.M)
        size = (int(full.group(1)), int(full.group(2))) if full else None
        vendor, size_key = "JEOL", "$CM_FULL_SIZE"
    elif re.search(r"^\s*(\[SemImageFile\]|InstructName\s*=)", text, re.M):  # Hitachi
        px = re.search(r"^\s*PixelSize\s*=\s*([0-9.eE+-]+)", text, re.M)
        if px:
            um = _length(px.group(1), "nm", "Hitachi PixelSize")
            if um is not None:
                found.append((um, "Hitachi", "Hitachi PixelSize (nm)"))
        ds = re.search(r"^\s*DataSize\s*=\s*(\d+)\s*[xX*]\s*(\d+)", text, re.M)
        size = (int(ds.group(1)), int(ds.group(2))) if ds else None
        vendor, size_key = "Hitachi", "DataSize"
    else:
        return [], None, None  # some other text file with the image's name
    if not found:
        return [], None, None
    bar_rows, bar_src = None, None
    if size is not None:
        if size[0] != w:
            log.warning("%s: the %s sidecar describes a %d x %d image but the file is %d x %d "
                        "(resampled?): pass --pixel-size UM if the pixel size is wrong",
                        path, vendor, size[0], size[1], w, h)
        elif 0 < h - size[1] < h:
            bar_rows, bar_src = h - size[1], f"{vendor} image height - {size_key} height"
    return found, bar_rows, bar_src


def _plausible(found: list[_Found]) -> list[_Found]:
    out = []
    for um, vendor, source in found:
        if _PLAUSIBLE_UM[0] <= um <= _PLAUSIBLE_UM[1]:
            out.append((um, vendor, source))
        else:
            log.warning("ignoring implausible pixel size %r µm from %s", um, source)
    return out


def _choose(found: list[_Found], name: str) -> tuple[float | None, str | None, str | None]:
    found = _plausible(found)
    if not found:
        return None, None, None
    um, vendor, source = found[0]
    for other, _, osrc in found[1:]:
        if abs(other - um) > _AGREE * um:
            log.warning("%s: pixel sizes disagree: %.6g µm from %s but %.6g µm from %s; using "
                        "%s (pass --pixel-size UM to choose)", name, um, source, other, osrc,
                        source)
    return round(um, 9), vendor, source


def calibrate(tif: tifffile.TiffFile | None, path: Path, shape: tuple[int, int],
              page: int = 0) -> Calibration:
    """Pixel size and declared data bar of the image at ``path`` (``tif``: it opened as TIFF).

    Parameters
    ----------
    tif : tifffile.TiffFile or None
        The open TIFF (``None`` for PNG/JPEG/BMP: only sidecar files are read).
    path : Path
        The image file (its ``<stem>.txt`` sidecar is looked for beside it).
    shape : tuple of int
        ``(height, width)`` of the image page, data bar included.
    page : int
        Index of the TIFF page read (vendor tags are per page: Zeiss multi-page files).

    Returns
    -------
    Calibration
        ``pixel_size_um`` is ``None`` when no source gave one (unknown).
    """
    h, w = shape
    found: list[_Found] = []
    bar: int | None = None
    bar_src: str | None = None
    if tif is not None:
        pg = tif.pages[page]
        tags = (pg if isinstance(pg, tifffile.TiffPage) else pg.aspage()).tags
        fei = tags.valueof(34680) or tags.valueof(34682)
        if isinstance(fei, dict) and fei:
            f, bar, bar_src = _fei(fei, w, h)
            found += f
        sem = tags.valueof(34118)
        if isinstance(sem, dict) and sem:
            found += _zeiss(sem, w)
        tescan = tags.valueof(50431)
        if tescan is not None:
            found += _tescan(tescan)
    side, sbar, sbar_src = sidecar_calibration(path, shape)
    found += side
    if bar is None:
        bar, bar_src = sbar, sbar_src
    if tif is not None:
        found += _ome(tif) + _imagej(tif)
    if bar is not None and not 0 <= bar < h:
        log.warning("%s: %s says %d data-bar rows but the image has %d rows: ignored",
                    path, bar_src, bar, h)
        bar, bar_src = None, None
    um, vendor, source = _choose(found, str(path))
    return Calibration(um, vendor, source, bar, bar_src)
