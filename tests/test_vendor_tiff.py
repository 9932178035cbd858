"""Vendor TIFF conventions: pixel sizes and data bars (semdask.ingest.vendors / .databar).

Real instrument files are read from ``../shared/data/vendor_tiff`` (GPL test data of
RosettaSciIO: read in place, never copied into the repository); every vendor rule
also has a tiny synthetic fixture written here with tifffile.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.errors import InputError
from semdask.ingest.convert import convert
from semdask.ingest.databar import databar_rows
from semdask.ingest.readers import open_image
from semdask.ingest.vendors import unit_to_um

VENDOR_DIR = Path(os.environ.get(
    "SEMDASK_VENDOR_TIFF", Path(__file__).resolve().parents[2] / "shared/data/vendor_tiff"))
EXPECTED = (json.loads((VENDOR_DIR / "expected.json").read_text())
            if (VENDOR_DIR / "expected.json").is_file() else {})
needs_vendor = pytest.mark.skipif(not EXPECTED, reason=f"no vendor TIFFs in {VENDOR_DIR}")
RNG = np.random.default_rng(7)


def _sem(h: int = 120, w: int = 160) -> np.ndarray:
    """A noisy SEM-like image (no two rows look drawn)."""
    return np.clip(RNG.normal(120, 30, (h, w)), 1, 250).astype(np.uint8)


def _fei_text(sections: dict[str, dict[str, object]]) -> str:
    return "".join(f"[{s}]\r\n" + "".join(f"{k}={v}\r\n" for k, v in kv.items()) + "\r\n"
                   for s, kv in sections.items())


def _write(path: Path, img: np.ndarray, tag: int | None = None, text: str | bytes = "",
           **kw: object) -> Path:
    extra = []
    if tag is not None:
        extra = [(tag, "B", len(text), text, True)] if isinstance(text, bytes) \
            else [(tag, "s", 0, text, True)]
    tifffile.imwrite(path, img, extratags=extra, **kw)
    return path


# ------------------------------------------------------------------ real vendor files


@needs_vendor
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_vendor_files_convert_with_pixel_size_and_bar_removed(tmp_path, name):
    exp = EXPECTED[name]
    img = open_image(VENDOR_DIR / name)
    assert img.pixel_size_um == pytest.approx(exp["pixel_size_um"], rel=1e-3)
    full = img.read(0, img.shape[0], 0, img.shape[1])
    m = convert(VENDOR_DIR / name, tmp_path / "a.ome.zarr", crop_databar=True, chunk=256)
    h, w = img.shape
    assert m.image.shape == (h - exp["databar_rows"], w)
    np.testing.assert_array_equal(m.image.compute(), full[: h - exp["databar_rows"]])
    assert m.pixel_size_um == pytest.approx(exp["pixel_size_um"], rel=1e-3)
    src = m.attrs["semdask"]["source"]
    assert src["cropped_rows"] == exp["databar_rows"]
    assert src["pixel_size_from"] == img.pixel_size_from is not None


@needs_vendor
def test_real_bars_cropped_by_default(tmp_path, caplog):
    fei = convert(VENDOR_DIR / "FEI-Helios-Ebeam-8bits.tif", tmp_path / "f.ome.zarr")
    assert fei.image.shape == (471 - 29, 512)
    assert fei.attrs["semdask"]["source"]["databar_from"] == "FEI [PrivateFei] DatabarHeight"
    with caplog.at_level(logging.WARNING, logger="semdask"):
        z = convert(VENDOR_DIR / "test_tiff_Zeiss_SEM_1k.tif", tmp_path / "z.ome.zarr")
    assert z.image.shape == (768 - 77, 1024)  # Zeiss declares no height: detected ...
    assert "77 data-bar rows detected and cropped" in caplog.text  # ... and said so
    assert z.attrs["semdask"]["source"]["databar_from"] == "detected"
    assert z.pixel_size_um == pytest.approx(2.614514, rel=1e-6)


def test_undeclared_bar_in_a_plain_image_is_only_reported(tmp_path, caplog):
    img = _sem(200, 160)
    img[150:] = 0
    img[166:180, 10:120] = 255
    tifffile.imwrite(tmp_path / "p.tif", img)
    with caplog.at_level(logging.WARNING, logger="semdask"):
        m = convert(tmp_path / "p.tif", tmp_path / "p.ome.zarr", pixel_size_um=0.01)
    assert m.image.shape == (200, 160)
    assert "50 rows look like an instrument data bar" in caplog.text


@needs_vendor
def test_real_databar_detection_fallback():
    """Without metadata the FEI and Zeiss bars are found from the pixels alone."""
    for name, rows in [("FEI-Helios-Ebeam-8bits.tif", 29), ("test_tiff_Zeiss_SEM_1k.tif", 77)]:
        img = open_image(VENDOR_DIR / name)
        a = img.read(0, img.shape[0], 0, img.shape[1])
        assert databar_rows(a) == rows
        assert databar_rows(a[:-rows]) == 0


@needs_vendor
def test_cli_converts_real_file(tmp_path):
    out = tmp_path / "n.ome.zarr"
    r = CliRunner().invoke(main, ["convert", str(VENDOR_DIR / "FEI-Helios-navcam.tif"), str(out)])
    assert r.exit_code == 0, r.output
    assert "512 x 768" in r.output and "pixel size 263.97" in r.output
    r = CliRunner().invoke(main, ["convert", str(VENDOR_DIR / "FEI-Helios-navcam.tif"),
                                  str(tmp_path / "k.ome.zarr"), "--crop-databar", "0"])
    assert r.exit_code == 0, r.output
    assert "551 x 768" in r.output


# ------------------------------------------------------------------ FEI / Thermo Fisher


def test_fei_scan_pixelwidth_and_databarheight(tmp_path):
    img = _sem(100, 128)
    text = _fei_text({"Scan": {"PixelWidth": "2.5e-08", "PixelHeight": "2.5e-08"},
                      "EBeam": {"HFW": 128 * 2.5e-8}, "Image": {"ResolutionX": 128,
                                                                 "ResolutionY": 88},
                      "PrivateFei": {"DatabarHeight": 12}})
    f = _write(tmp_path / "fei.tif", img, 34682, text)
    im = open_image(f)
    assert (im.pixel_size_um, im.pixel_size_from) == (pytest.approx(0.025),
                                                      "FEI [Scan] PixelWidth")
    assert (im.databar_rows, im.databar_from) == (12, "FEI [PrivateFei] DatabarHeight")
    m = convert(f, tmp_path / "fei.ome.zarr")
    np.testing.assert_array_equal(m.image.compute(), img[:88])
    assert m.pixel_size_um == pytest.approx(0.025)


def test_fei_irbeam_fallback_and_resolution_y_bar(tmp_path):
    """Navigation camera: no [Scan] PixelWidth, HFW / ResolutionX; bar from ResolutionY."""
    text = _fei_text({"IRBeam": {"HFW": 0.2}, "Image": {"ResolutionX": 160,
                                                        "ResolutionY": 100}})
    im = open_image(_write(tmp_path / "nav.tif", _sem(120, 160), 34682, text))
    assert im.pixel_size_um == pytest.approx(0.2e6 / 160)
    assert im.pixel_size_from == "FEI [IRBeam] HFW / [Image] ResolutionX"
    assert (im.databar_rows, im.databar_from) == (20, "FEI image height - [Image] ResolutionY")


def test_fei_escan_and_contradiction_warns(tmp_path, caplog):
    text = _fei_text({"EScan": {"PixelWidth": "1e-08"}, "EBeam": {"HFW": 160 * 2e-8},
                      "Image": {"ResolutionX": 160}})
    with caplog.at_level(logging.WARNING, logger="semdask"):
        im = open_image(_write(tmp_path / "c.tif", _sem(), 34682, text))
    assert im.pixel_size_um == pytest.approx(0.01)
    assert "disagree" in caplog.text and "using FEI [EScan] PixelWidth" in caplog.text
    assert "--pixel-size" in caplog.text


# ------------------------------------------------------------------ Zeiss


def _zeiss(record_m: float | None, **entries: str) -> str:
    rec = "" if record_m is None else f"0\r\n0\r\n0\r\n{record_m:e}\r\n1.0e+002\r\n"
    return rec + "".join(f"{k.upper()}\r\n{v}\r\n" for k, v in entries.items())


@pytest.mark.parametrize("width", [512, 1024, 2048])
def test_zeiss_pixel_size_scales_with_width(tmp_path, width):
    """SmartSEM pixel sizes refer to a 1024-px display (HyperSpy/RosettaSciIO convention)."""
    text = _zeiss(5.824988e-9, ap_pixel_size="Pixel Size = 5.825 nm",
                  dp_image_store=f"Store resolution = {width} * {width * 3 // 4}")
    im = open_image(_write(tmp_path / "z.tif", _sem(32, width), 34118, text))
    assert im.pixel_size_um == pytest.approx(0.005824988 * 1024 / width, rel=1e-6)
    assert im.vendor == "Zeiss" and "1024 / image width" in (im.pixel_size_from or "")


def test_zeiss_without_record(tmp_path, caplog):
    # ap_pixel_size alone (older SmartSEM) is display-referenced too
    im = open_image(_write(tmp_path / "a.tif", _sem(32, 512), 34118,
                           _zeiss(None, ap_pixel_size="Pixel Size = 5.825 nm")))
    assert im.pixel_size_um == pytest.approx(0.01165)
    # ap_image_pixel_size is already per image pixel; ap_width / width agrees
    im = open_image(_write(tmp_path / "b.tif", _sem(32, 512), 34118,
                           _zeiss(None, ap_image_pixel_size="Image Pixel Size = 11.65 nm",
                                  ap_width="Width = 5.965 um")))
    assert im.pixel_size_um == pytest.approx(0.01165)
    # latin-1 'µm' as the instrument writes it, bytes tag
    raw = _zeiss(None, ap_image_pixel_size="Image Pixel Size = 2.615 µm").encode("latin-1")
    im = open_image(_write(tmp_path / "c.tif", _sem(32, 64), 34118, raw))
    assert im.pixel_size_um == pytest.approx(2.615)
    # an unknown unit is reported, the source skipped: pixel size unknown
    with caplog.at_level(logging.WARNING, logger="semdask"):
        im = open_image(_write(tmp_path / "d.tif", _sem(32, 64), 34118,
                               _zeiss(None, ap_image_pixel_size="Image Pixel Size = 3 furlong")))
    assert im.pixel_size_um is None and "unknown length unit 'furlong'" in caplog.text


def test_zeiss_style_bar_is_detected(tmp_path):
    """Black rule above a white bar with black text; one image row below (as SmartSEM)."""
    img = _sem(300, 256)
    img[240] = 0
    img[241:299] = 255
    img[241:299, :2] = img[241:299, -2:] = 0
    img[250:262, 20:120:3] = 0
    img[280:284, 150:230] = 0  # scale bar
    img[298] = 0
    img[299] = _sem(1, 256)[0]
    assert databar_rows(img) == 60
    m = convert(_write(tmp_path / "z.tif", img), tmp_path / "z.ome.zarr", crop_databar=True)
    assert m.image.shape == (240, 256)
    assert m.attrs["semdask"]["source"]["databar_from"] == "detected"


# ------------------------------------------------------------------ TESCAN


def test_tescan_pixelsizex(tmp_path):
    text = "[MAIN]\r\nDevice=VEGA3\r\nPixelSizeX=1.25e-008\r\nPixelSizeY=1.25e-008\r\n"
    im = open_image(_write(tmp_path / "t.tif", _sem(), 50431, text.encode()))
    assert (im.pixel_size_um, im.vendor) == (pytest.approx(0.0125), "TESCAN")


# ------------------------------------------------------------------ Hitachi / JEOL sidecars


def test_hitachi_sidecar_pixel_size_and_bar(tmp_path):
    img = _sem(136, 160)
    f = _write(tmp_path / "h.tif", img)
    text = "[SemImageFile]\r\nInstructName=S-4800\r\nDataSize=160x120\r\nPixelSize=19.84375\r\n"
    f.with_suffix(".txt").write_bytes(text.encode("utf-16"))
    im = open_image(f)
    assert (im.pixel_size_um, im.vendor) == (pytest.approx(0.01984375), "Hitachi")
    assert (im.databar_rows, im.databar_from) == (16, "Hitachi image height - DataSize height")
    m = convert(f, tmp_path / "h.ome.zarr")
    assert m.image.shape == (120, 160)


def test_jeol_sidecar_micron_bar_and_png(tmp_path):
    from PIL import Image

    img = _sem(104, 160)
    f = tmp_path / "j.png"
    Image.fromarray(img).save(f)
    f.with_suffix(".txt").write_bytes(
        b"$CM_FORMAT JEOL-SEM\r\n$CM_FULL_SIZE 160 96\r\n$CM_MAG 5000\r\n"
        b"$$SM_MICRON_BAR 80\r\n$$SM_MICRON_MARKER 2\xb5m\r\n")  # latin-1 µ
    im = open_image(f)
    assert (im.pixel_size_um, im.vendor) == (pytest.approx(0.025), "JEOL")
    assert im.databar_rows == 8
    (tmp_path / "notes.txt").write_text("PixelSize=1\n")  # other stems are not sidecars
    f2 = tmp_path / "k.png"
    Image.fromarray(img).save(f2)
    f2.with_suffix(".txt").write_text("meeting notes\nPixelSize=3\n")  # not Hitachi's
    assert open_image(f2).pixel_size_um is None


# ------------------------------------------------------------------ OME-TIFF and ImageJ


@pytest.mark.parametrize(("value", "unit", "um"), [
    (25.0, "nm", 0.025), (0.5, None, 0.5), (0.002, "mm", 2.0), (250.0, "Å", 0.025)])
def test_ome_physical_size_units(tmp_path, value, unit, um):
    meta: dict[str, object] = {"PhysicalSizeX": value, "PhysicalSizeY": value}
    if unit:
        meta.update(PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    f = tmp_path / "o.ome.tif"
    tifffile.imwrite(f, _sem(), ome=True, metadata=meta)
    im = open_image(f)
    assert im.pixel_size_um == pytest.approx(um)
    assert im.pixel_size_from == "OME Pixels PhysicalSizeX"


@pytest.mark.parametrize(("unit", "um"), [
    ("micron", 0.05), ("um", 0.05), ("\\u00B5m", 0.05), ("nm", 5e-5), ("pixel", None)])
def test_imagej_calibration(tmp_path, unit, um):
    f = tmp_path / "ij.tif"
    tifffile.imwrite(f, _sem(), imagej=True, resolution=(20.0, 20.0), metadata={"unit": unit})
    im = open_image(f)
    assert im.pixel_size_um == (None if um is None else pytest.approx(um))


def test_plain_tiff_resolution_is_not_a_pixel_size(tmp_path, caplog):
    f = tmp_path / "dpi.tif"
    tifffile.imwrite(f, _sem(), resolution=(300, 300), resolutionunit="INCH")
    assert open_image(f).pixel_size_um is None
    with caplog.at_level(logging.WARNING, logger="semdask"):
        m = convert(f, tmp_path / "dpi.ome.zarr")
    assert m.pixel_size_um is None and m.attrs["semdask"]["source"]["pixel_size_from"] is None
    assert "pixel size unknown" in caplog.text and "--pixel-size 0.01" in caplog.text


def test_vendor_wins_over_imagej_with_a_warning(tmp_path, caplog):
    f = tmp_path / "both.tif"
    text = _fei_text({"Scan": {"PixelWidth": "1e-08"}})
    with caplog.at_level(logging.WARNING, logger="semdask"):
        tifffile.imwrite(f, _sem(), imagej=True, resolution=(10.0, 10.0),
                         metadata={"unit": "um"}, extratags=[(34682, "s", 0, text, True)])
        im = open_image(f)
    assert im.pixel_size_um == pytest.approx(0.01)
    assert "0.1 µm from ImageJ unit + XResolution" in caplog.text


def test_unit_table():
    assert unit_to_um(1, "pm") == 1e-6 and unit_to_um(3, "µm") == 3 and unit_to_um(3, "μm") == 3
    with pytest.raises(InputError, match="--pixel-size"):
        unit_to_um(1, "parsec")


# ------------------------------------------------------------------ palette images


def test_grey_palette_is_mapped_colour_palette_refused(tmp_path):
    idx = RNG.integers(0, 256, (40, 50)).astype(np.uint8)
    inverted = np.tile((np.arange(255, -1, -1, dtype=np.uint16) * 257), (3, 1))
    f = tmp_path / "pal.tif"
    tifffile.imwrite(f, idx, photometric="palette", colormap=inverted)
    np.testing.assert_array_equal(open_image(f).read(0, 40, 0, 50), 255 - idx)
    colour = inverted.copy()
    colour[0] = 0
    tifffile.imwrite(tmp_path / "c.tif", idx, photometric="palette", colormap=colour)
    with pytest.raises(InputError, match="grey colour map"):
        open_image(tmp_path / "c.tif")


# ------------------------------------------------------------------ data-bar rules


def test_databar_metadata_first_then_detection_then_argument(tmp_path, caplog):
    img = _sem(100, 128)
    img[80] = 252  # FEI-like white rule, bar below, 3 black image rows above
    img[81:] = 0
    img[77:80] = 0
    img[85:95, 10:60:4] = 255
    text = _fei_text({"Scan": {"PixelWidth": "1e-08"}, "PrivateFei": {"DatabarHeight": 20}})
    f = _write(tmp_path / "f.tif", img, 34682, text)
    assert databar_rows(img) == 20  # the rule, not the black rows above it
    m = convert(f, tmp_path / "meta.ome.zarr", crop_databar=True)
    assert m.attrs["semdask"]["source"]["databar_from"] == "FEI [PrivateFei] DatabarHeight"
    with caplog.at_level(logging.WARNING, logger="semdask"):
        m = convert(f, tmp_path / "arg.ome.zarr", crop_databar=10)
    assert m.image.shape == (90, 128) and "says the data bar has 20" in caplog.text
    m = convert(f, tmp_path / "none.ome.zarr", crop_databar=False)
    assert m.image.shape == (100, 128)


def test_databar_detection_is_conservative():
    assert databar_rows(_sem()) == 0
    levels = RNG.integers(0, 3, (120, 160)).astype(np.uint8) * 100  # a 3-level image
    assert databar_rows(levels) == 0
    flat = np.full((120, 160), 30, np.uint8)
    assert databar_rows(flat) == 0
    thick = _sem()
    thick[100:] = 0  # a black band with nothing drawn in it: not a bar
    assert databar_rows(thick) == 0


def test_bar_without_rule_is_detected():
    """A black bar with white text straight under the image (no rule line)."""
    img = _sem(200, 160)
    img[150:] = 0
    img[166:180, 10:120] = 255
    assert databar_rows(img) == 50


def test_tile_grid_tiles_cropped_by_their_metadata(tmp_path):
    text = _fei_text({"Scan": {"PixelWidth": "1e-08"}, "PrivateFei": {"DatabarHeight": 16}})
    a, b = _sem(80, 64), _sem(80, 64)
    _write(tmp_path / "a.tif", a, 34682, text)
    _write(tmp_path / "b.tif", b, 34682, text)
    (tmp_path / "o.csv").write_text("file,y,x\na.tif,0,0\nb.tif,0,64\n")
    m = convert([tmp_path / "a.tif", tmp_path / "b.tif"], tmp_path / "g.ome.zarr",
                tile_offsets=tmp_path / "o.csv")
    np.testing.assert_array_equal(m.image.compute(), np.hstack([a[:64], b[:64]]))
    src = m.attrs["semdask"]["source"]
    assert src["cropped_rows"] == [16, 16] and src["pixel_size_from"] == "FEI [Scan] PixelWidth"


def test_cli_reports_unknown_pixel_size(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", _sem())
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "p.tif"), str(tmp_path / "p.ome.zarr")])
    assert r.exit_code == 0, r.output
    assert "pixel size unknown (pass --pixel-size UM)" in r.output


def test_multipage_vendor_tags_are_read_per_page(tmp_path):
    """Zeiss writes a CZ_SEM tag in every page of a multi-page file."""
    f = tmp_path / "multi.tif"
    with tifffile.TiffWriter(f) as tw:
        for nm in (10.0, 20.0):
            text = _zeiss(None, ap_image_pixel_size=f"Image Pixel Size = {nm} nm")
            tw.write(_sem(32, 64), extratags=[(34118, "s", 0, text, True)])
    assert open_image(f, page=0).pixel_size_um == pytest.approx(0.01)
    assert open_image(f, page=1).pixel_size_um == pytest.approx(0.02)


def test_zeiss_record_must_match_ap_pixel_size_and_implausible_is_ignored(tmp_path, caplog):
    # an unnamed record whose 4th value is not the pixel size: ap_pixel_size is used
    text = _zeiss(3.0e-3, ap_pixel_size="Pixel Size = 5.825 nm")
    with caplog.at_level(logging.WARNING, logger="semdask"):
        im = open_image(_write(tmp_path / "r.tif", _sem(32, 512), 34118, text))
    assert im.pixel_size_um == pytest.approx(0.01165)
    assert "record layout not recognised" in caplog.text
    text = _fei_text({"Scan": {"PixelWidth": "5"}})  # 5 m per pixel: a corrupt tag
    with caplog.at_level(logging.WARNING, logger="semdask"):
        im = open_image(_write(tmp_path / "i.tif", _sem(), 34682, text))
    assert im.pixel_size_um is None and "implausible" in caplog.text
