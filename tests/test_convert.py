"""Tests for semdask.convert / semdask.readers and the ``convert`` CLI sub-command."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from semdask.cli.main import main
from semdask.errors import InputError, UnsafePathError
from semdask.ingest.convert import convert, convert_each, image_to_dask
from semdask.ingest.databar import databar_rows
from semdask.ingest.readers import open_image
from semdask.ingest.tilegrid import TileGrid, read_tile_offsets
from semdask.ingest.vendors import unit_to_um
from semdask.storage import io as sio

RNG = np.random.default_rng(0)


def _img(h: int = 96, w: int = 128, dtype: str = "uint8") -> np.ndarray:
    hi = 255 if dtype == "uint8" else 60000
    return RNG.integers(0, hi, (h, w)).astype(dtype)


def _semdask_attrs(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["semdask"]


# ------------------------------------------------------------------ TIFF reading


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("kw", [{}, {"compression": "zlib", "rowsperstrip": 16}])
def test_tiff_roundtrip(tmp_path, dtype, kw):
    a = _img(dtype=dtype)
    tifffile.imwrite(tmp_path / "a.tif", a, **kw)
    m = convert([tmp_path / "a.tif"], tmp_path / "a.ome.zarr", pixel_size_um=0.01, chunk=64)
    assert m.image.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(m.image.compute(), a)
    assert m.pixel_size_um == pytest.approx(0.01)
    src = m.attrs["semdask"]["source"]
    assert src["files"] == [str(tmp_path / "a.tif")]
    assert src["cropped_rows"] == 0
    assert src["pixel_size_from"] == "argument"
    assert m.attrs["semdask"]["complete"] is True


def test_tiled_bigtiff_is_read_lazily(tmp_path):
    a = _img(300, 520, "uint16")
    f = tmp_path / "big.tif"
    tifffile.imwrite(f, a, tile=(64, 64), compression="zlib", bigtiff=True)
    x = image_to_dask(open_image(f), 128)
    assert isinstance(x, da.Array)
    assert x.numblocks == (3, 5)
    np.testing.assert_array_equal(x.compute(), a)
    # corrupt the last tile: the first chunk still reads (only its tiles are decoded),
    # the chunk holding the bad tile raises an actionable InputError
    with tifffile.TiffFile(f) as tif:
        off, n = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    raw = bytearray(f.read_bytes())
    raw[off : off + n] = b"\x00garbage" * (n // 8) + b"\x00" * (n % 8)
    f.write_bytes(bytes(raw))
    x = image_to_dask(open_image(f), 128)
    np.testing.assert_array_equal(x.blocks[0, 0].compute(), a[:128, :128])
    with pytest.raises(InputError, match=r"could not read .*re-export"):
        x.blocks[-1, -1].compute()


def test_rgb_equal_channels_become_grey(tmp_path, caplog):
    a = _img()
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([a] * 3, -1), photometric="rgb",
                     tile=(32, 32))
    rgba = np.stack([a, a, a, np.full_like(a, 255)], -1)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    with caplog.at_level(logging.WARNING, logger="semdask"):
        for name in ("rgb.tif", "rgba.tif"):
            img = open_image(tmp_path / name)
            np.testing.assert_array_equal(image_to_dask(img, 64).compute(), a)
    assert "equal channels, read as grey" in caplog.text


def test_rgb_unequal_channels_raise(tmp_path):
    a = _img()
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([a, a, 255 - a], -1), photometric="rgb")
    with pytest.raises(InputError, match=r"different colour channels.*Fix"):
        open_image(tmp_path / "rgb.tif")


def test_stack_raises_and_page_selects(tmp_path):
    stack = np.stack([_img(), _img()])
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    with pytest.raises(InputError, match=r"single 2-D image, got 2 pages.*--page"):
        convert([tmp_path / "stack.tif"], tmp_path / "o.ome.zarr")
    m = convert([tmp_path / "stack.tif"], tmp_path / "o.ome.zarr", page=1)
    np.testing.assert_array_equal(m.image.compute(), stack[1])
    tifffile.imwrite(tmp_path / "planes.tif", RNG.integers(0, 9, (5, 20, 20), np.uint8),
                     planarconfig="separate", photometric="minisblack")
    with pytest.raises(InputError, match="single 2-D image"):
        open_image(tmp_path / "planes.tif")


def test_corrupt_and_missing_files(tmp_path):
    a = _img()
    f = tmp_path / "a.tif"
    tifffile.imwrite(f, a, compression="zlib")
    (tmp_path / "trunc.tif").write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (tmp_path / "junk.tif").write_bytes(b"this is not a TIFF file at all")
    for name in ("trunc.tif", "junk.tif"):
        with pytest.raises(InputError, match=r"could not read .*Fix: re-export"):
            open_image(tmp_path / name)
    with pytest.raises(UnsafePathError):
        convert([tmp_path / "missing.tif"], tmp_path / "o.ome.zarr")
    tifffile.imwrite(tmp_path / "i16.tif", a.astype(np.int16))
    with pytest.raises(InputError, match="pixel type"):
        open_image(tmp_path / "i16.tif")
    assert not (tmp_path / "o.ome.zarr").exists()


# ------------------------------------------------------------------ PNG / folders


def test_png_grey_16bit_and_rgb(tmp_path):
    a8, a16 = _img(), _img(dtype="uint16")
    Image.fromarray(a8).save(tmp_path / "g.png")
    Image.fromarray(np.stack([a8] * 3, -1)).save(tmp_path / "rgb.png")
    Image.fromarray(a16).save(tmp_path / "g16.png")
    for name, want in (("g.png", a8), ("rgb.png", a8), ("g16.png", a16)):
        m = convert(tmp_path / name, tmp_path / f"{name}.ome.zarr")
        assert m.image.dtype == want.dtype
        np.testing.assert_array_equal(m.image.compute(), want)
        assert m.pixel_size_um is None


def test_folder_converts_each_image(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    imgs = {"a": _img(), "b": _img(40, 50)}
    for k, v in imgs.items():
        tifffile.imwrite(d / f"{k}.tif", v)
    (d / "notes.txt").write_text("ignored")
    with pytest.raises(InputError, match="tile-offsets"):
        convert(d, tmp_path / "one.ome.zarr")
    ms = convert_each(d, tmp_path / "out")
    assert [m.path.name for m in ms] == ["a.ome.zarr", "b.ome.zarr"]
    for m, v in zip(ms, imgs.values(), strict=True):
        np.testing.assert_array_equal(m.image.compute(), v)


# ------------------------------------------------------------------ tile grids


def _grid(tmp_path, image, tile, step, csv_header="file,y,x"):
    h, w = image.shape
    rows = [csv_header]
    for y in range(0, h - tile + 1, step):
        for x in range(0, w - tile + 1, step):
            name = f"t_{y}_{x}.tif"
            tifffile.imwrite(tmp_path / name, image[y : y + tile, x : x + tile])
            rows.append(f"{name},{y},{x}")
    (tmp_path / "offsets.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "offsets.csv"


def test_tile_grid_fuses_exactly(tmp_path):
    a = _img(160, 208, "uint16")
    csv = _grid(tmp_path, a, tile=64, step=48)  # 16 px overlaps, covers 160 x 208 exactly
    m = convert([tmp_path], tmp_path / "fused.ome.zarr", tile_offsets=csv, chunk=64)
    np.testing.assert_array_equal(m.image.compute(), a)
    src = m.attrs["semdask"]["source"]
    assert len(src["files"]) == 12
    assert src["blending"] == "linear"


def test_tile_grid_seam_is_linear_ramp(tmp_path):
    tifffile.imwrite(tmp_path / "l.tif", np.full((32, 64), 100, np.float32))
    tifffile.imwrite(tmp_path / "r.tif", np.full((32, 64), 200, np.float32))
    (tmp_path / "o.csv").write_text("File, Y, X\nl.tif,5,10\nr.tif,5,54\n")  # 20 px overlap
    grid = TileGrid([open_image(tmp_path / "l.tif"), open_image(tmp_path / "r.tif")],
                    [(5, 10), (5, 54)])
    assert grid.shape == (32, 108)
    fused = image_to_dask(grid, 16).compute()
    np.testing.assert_array_equal(fused[:, :44], 100)
    np.testing.assert_array_equal(fused[:, 64:], 200)
    k = np.arange(20)
    np.testing.assert_allclose(fused[:, 44:64], np.broadcast_to(100 + 100 * (k + 0.5) / 20,
                                                                (32, 20)), rtol=1e-6)
    m = convert([tmp_path / "l.tif", tmp_path / "r.tif"], tmp_path / "s.ome.zarr",
                tile_offsets=tmp_path / "o.csv", chunk=16)
    np.testing.assert_allclose(m.image.compute(), fused)


def test_tile_offsets_csv_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("a.tif,0,0\n")
    with pytest.raises(InputError, match="header"):
        read_tile_offsets(tmp_path / "bad.csv")
    (tmp_path / "nan.csv").write_text("file,y,x\na.tif,zero,0\n")
    with pytest.raises(InputError, match="line 2"):
        read_tile_offsets(tmp_path / "nan.csv")
    tifffile.imwrite(tmp_path / "a.tif", _img())
    (tmp_path / "miss.csv").write_text("file,y,x\nb.tif,0,0\n")
    with pytest.raises(InputError, match=r"'b\.tif'"):
        convert([tmp_path / "a.tif"], tmp_path / "o.ome.zarr", tile_offsets=tmp_path / "miss.csv")
    with pytest.raises(UnsafePathError):
        read_tile_offsets(tmp_path / "none.csv")


# ------------------------------------------------------------------ vendor pixel sizes

FEI = (
    "[User]\r\nDate=06/14/2023\r\nTime=11:02:13 AM\r\nUser=user\r\n\r\n"
    "[System]\r\nType=DualBeam\r\nSystemType=Helios G4 UX\r\nSource=FEG\r\n\r\n"
    "[Beam]\r\nHV=5000\r\nSpot=3.5\r\n\r\n"
    "[Scan]\r\nInternalScan=true\r\nDwelltime=3e-06\r\nPixelWidth=4.458e-08\r\n"
    "PixelHeight=4.458e-08\r\nHorFieldsize=9.13e-05\r\n\r\n"
    "[EScan]\r\nMainslock=On\r\nPixelWidth=4.458e-08\r\n"
)
ZEISS = (
    "0\r\n0\r\n"
    "AP_WD\r\nWD = 8.5 mm\r\n"
    "AP_IMAGE_PIXEL_SIZE\r\nImage Pixel Size = 44.58 nm\r\n"
    "DP_DETECTOR_CHANNEL\r\nSignal A = SE2\r\n"
    "AP_MAG\r\nMag = 2.50 K X\r\n"
    "SV_SERIAL_NUMBER\r\nSerial No. = 1234\r\n"
)
TESCAN = (
    "[MAIN]\r\nDevice=MIRA3 LMH\r\nMagnification=2500\r\n"
    "PixelSizeX=4.458e-008\r\nPixelSizeY=4.458e-008\r\nWD=0.0085\r\n"
)


@pytest.mark.parametrize(
    ("tag", "text", "vendor", "as_bytes"),
    [
        (34682, FEI, "FEI/Thermo Fisher", False),
        (34118, ZEISS, "Zeiss", False),
        (50431, TESCAN, "TESCAN", False),
        (50431, TESCAN, "TESCAN", True),
    ],
)
def test_vendor_pixel_size_roundtrip(tmp_path, tag, text, vendor, as_bytes):
    extra = (tag, "B", len(text), text.encode(), True) if as_bytes else (tag, "s", 0, text, True)
    tifffile.imwrite(tmp_path / "v.tif", _img(), extratags=[extra])
    img = open_image(tmp_path / "v.tif")
    assert img.pixel_size_um == pytest.approx(0.04458)
    assert img.vendor == vendor
    m = convert(tmp_path / "v.tif", tmp_path / "v.ome.zarr")
    assert m.pixel_size_um == pytest.approx(0.04458)
    assert m.attrs["semdask"]["source"]["vendor"] == vendor


def test_pixel_size_flag_wins_and_missing_warns(tmp_path, caplog):
    tifffile.imwrite(tmp_path / "v.tif", _img(), extratags=[(34682, "s", 0, FEI, True)])
    tifffile.imwrite(tmp_path / "n.tif", _img())
    with caplog.at_level(logging.WARNING, logger="semdask"):
        m = convert(tmp_path / "v.tif", tmp_path / "v.ome.zarr", pixel_size_um=0.05)
        assert m.pixel_size_um == pytest.approx(0.05)
        assert "overrides the FEI/Thermo Fisher metadata" in caplog.text
        m = convert(tmp_path / "n.tif", tmp_path / "n.ome.zarr")
        assert m.pixel_size_um is None
        assert "pixel size unknown" in caplog.text and "--pixel-size" in caplog.text
    with pytest.raises(InputError, match="positive"):
        convert(tmp_path / "n.tif", tmp_path / "x.ome.zarr", pixel_size_um=-1.0)
    assert unit_to_um(1.5, "µm") == 1.5


# ------------------------------------------------------------------ data bar


def _with_bar(h=200, w=160, bar=24):
    a = np.clip(RNG.normal(110, 25, (h, w)), 1, 254).astype(np.uint8)
    a[h - bar :] = 0
    a[h - bar] = 255  # separator line
    a[h - bar + 6 : h - bar + 14, 10:60:3] = 255  # "text"
    a[h - 6 : h - 4, 100:150] = 255  # scale bar
    return a


def test_databar_detection():
    a = _with_bar()
    assert databar_rows(a) == 24
    assert databar_rows(a[:-24]) == 0  # no bar: nothing cropped
    assert databar_rows(np.full((50, 50), 7, np.uint8)) == 0
    dark = a.copy()
    dark[:176] //= 8  # a very dark image is not mistaken for bar
    assert databar_rows(dark) == 24
    pores = a.copy()
    pores[:176][RNG.random((176, 160)) < 0.6] = 0  # 60 % black pores in every row
    assert databar_rows(pores) == 24


def test_crop_databar_auto_and_rows(tmp_path):
    a = _with_bar()
    tifffile.imwrite(tmp_path / "b.tif", a, tile=(32, 32))
    m = convert(tmp_path / "b.tif", tmp_path / "auto.ome.zarr", crop_databar=True)
    np.testing.assert_array_equal(m.image.compute(), a[:-24])
    assert m.attrs["semdask"]["source"]["cropped_rows"] == 24
    m = convert(tmp_path / "b.tif", tmp_path / "rows.ome.zarr", crop_databar=30)
    assert m.image.shape == (170, 160)
    with pytest.raises(InputError, match="crop_databar"):
        convert(tmp_path / "b.tif", tmp_path / "bad.ome.zarr", crop_databar=500)


# ------------------------------------------------------------------ outputs and CLI


def test_ngff04_export(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", _img())
    m = convert(tmp_path / "a.tif", tmp_path / "a.ome.zarr", ngff="0.4", pixel_size_um=0.1)
    exp = tmp_path / "a.ngff04.ome.zarr"
    assert (exp / ".zattrs").is_file()
    assert m.path == (tmp_path / "a.ome.zarr").resolve()
    with pytest.raises(InputError, match="ngff"):
        convert(tmp_path / "a.tif", tmp_path / "b.ome.zarr", ngff="0.3")


def test_cli_convert(tmp_path):
    a = _img()
    tifffile.imwrite(tmp_path / "a.tif", np.vstack([a, np.zeros((8, 128), np.uint8)]))
    runner = CliRunner()
    out = tmp_path / "a.ome.zarr"
    r = runner.invoke(main, ["convert", str(tmp_path / "a.tif"), str(out), "--pixel-size",
                             "0.02", "--crop-databar", "8", "--chunk", "64"])
    assert r.exit_code == 0, r.output
    assert "96 x 128 uint8, pixel size 0.02 µm" in r.output
    np.testing.assert_array_equal(sio.open_mosaic(out).image.compute(), a)
    r = runner.invoke(main, ["convert", str(tmp_path / "a.tif"), str(out)])
    assert r.exit_code != 0
    assert "overwrite" in r.output
    r = runner.invoke(main, ["convert", str(tmp_path / "a.tif"), str(out), "--overwrite",
                             "--crop-databar=auto"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["convert", str(tmp_path / "a.tif"), str(out), "--crop-databar=x"])
    assert r.exit_code != 0


def test_cli_bad_input_leaves_no_complete_store(tmp_path):
    runner = CliRunner()
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    r = runner.invoke(main, ["convert", str(tmp_path / "junk.tif"), str(tmp_path / "j.ome.zarr")])
    assert r.exit_code != 0
    assert "could not read" in r.output
    assert not (tmp_path / "j.ome.zarr").exists()
    # a tile that is corrupt deep inside the file fails during the write
    a = _img(128, 128)
    f = tmp_path / "late.tif"
    tifffile.imwrite(f, a, tile=(32, 32), compression="zlib")
    with tifffile.TiffFile(f) as tif:
        off, n = tif.pages[0].dataoffsets[-1], tif.pages[0].databytecounts[-1]
    raw = bytearray(f.read_bytes())
    raw[off : off + n] = bytes(n)
    f.write_bytes(bytes(raw))
    out = tmp_path / "late.ome.zarr"
    r = runner.invoke(main, ["convert", str(f), str(out), "--chunk", "32"])
    assert r.exit_code != 0
    assert "could not read" in r.output
    assert not out.exists() or _semdask_attrs(out)["complete"] is False


def test_cli_folder_and_grid(tmp_path):
    d = tmp_path / "tiles"
    d.mkdir()
    a = _img(96, 96)
    csv = _grid(d, a, tile=64, step=32)
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(d), str(tmp_path / "each")])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "each").glob("*.ome.zarr"))) == 4
    r = runner.invoke(main, ["convert", str(d), str(tmp_path / "g.ome.zarr"),
                             "--tile-offsets", str(csv)])
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(sio.open_mosaic(tmp_path / "g.ome.zarr").image.compute(), a)
