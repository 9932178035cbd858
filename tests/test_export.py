"""``semdask export`` (NGFF 0.4, OME-TIFF) and ``semdask export-model`` (ONNX, bioimage.io)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import torch
import zarr
from click.testing import CliRunner
from ome_zarr_models.v04.image import Image as Image04

from semdask.cli.main import main
from semdask.nets.model import ModelConfig, receptive_field, save_model
from semdask.nets.unet import UNet
from semdask.storage import arrays as sarr
from semdask.storage import io
from semdask.storage.export import _tiles, export_tiff

CLASSES = ["pore", "Ni", "NiO", "YSZ"]
PX = 0.05


@pytest.fixture
def store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (300, 410), dtype=np.uint8)
    m = io.write_image(tmp_path / "m.ome.zarr", da.from_array(img, chunks=128),
                       pixel_size_um=PX, levels=2, chunk=128)
    io.write_labels(m.path, (img // 64).astype(np.uint8), classes=CLASSES, chunk=128)
    io.write_extra_image(m.path, "probs",
                         da.from_array(rng.random((4, 300, 410)).astype(np.float16),
                                       chunks=(4, 128, 128)), channel_names=CLASSES, chunk=128)
    return m.path


def _run(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, [*args])
    return r.exit_code, r.output


def test_ngff04_with_a_sibling_image(store: Path, tmp_path: Path) -> None:
    code, out = _run("export", str(store), str(tmp_path / "o.zarr"), "--group", "labels/phases",
                     "--group", "probs")
    assert code == 0, out
    root = zarr.open_group(tmp_path / "o.zarr", mode="r", zarr_format=2)
    Image04.from_zarr(root)  # OME-NGFF 0.4 metadata validates
    Image04.from_zarr(root["probs"])
    np.testing.assert_array_equal(root["probs/0"][:], io.open_extra_image(store, "probs"))
    np.testing.assert_array_equal(root["labels/phases/1"][:],
                                  io.open_labels(store).level(1).compute())
    assert root.attrs["semdask"]["complete"] is True
    code, out = _run("export", str(store), str(tmp_path / "p.zarr"), "--group", "nothing")
    assert code == 2 and "labels/phases" in out and "--group" in out  # says what exists


def test_tiff_is_calibrated_pyramidal_and_exact(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.ome.tif"
    code, msg = _run("export", str(store), str(out), "--format", "tiff")
    assert code == 0, msg
    with tifffile.TiffFile(out) as t:
        assert t.is_ome
        s = t.series[0]
        np.testing.assert_array_equal(s.asarray(), io.open_mosaic(store).image.compute())
        assert len(s.levels) == 2
        np.testing.assert_array_equal(s.levels[1].asarray(),
                                      io.open_mosaic(store).level(1).compute())
        page = t.pages[0]
        assert page.is_tiled and page.tilewidth == 512
        assert 'PhysicalSizeX="0.05"' in t.ome_metadata
        assert 'PhysicalSizeXUnit="µm"' in t.ome_metadata
        xres = page.tags["XResolution"].value  # px per cm: 1e4 / 0.05
        assert xres[0] / xres[1] == pytest.approx(1e4 / PX)
    assert not list(tmp_path.glob("*.partial"))


def test_tiff_of_labels_at_a_level_and_of_probs(store: Path, tmp_path: Path) -> None:
    lab = export_tiff(store, tmp_path / "lab.ome.tif", group="labels/phases", level=1, tile=64)
    with tifffile.TiffFile(lab) as t:
        np.testing.assert_array_equal(t.asarray(), io.open_labels(store).level(1).compute())
        assert 'PhysicalSizeX="0.1"' in t.ome_metadata  # level 1: twice the pixel size
        assert "1=Ni" in t.ome_metadata
    code, msg = _run("export", str(store), str(tmp_path / "all.tif"), "--format", "tiff",
                     "--group", "probs", "--group", "image")
    assert code == 0, msg
    probs = tifffile.imread(tmp_path / "all.probs.ome.tif")
    assert probs.dtype == np.float32 and probs.shape == (4, 300, 410)
    np.testing.assert_array_equal(probs, io.open_extra_image(store, "probs").compute())
    assert (tmp_path / "all.image.ome.tif").is_file()


def test_tiles_are_computed_one_band_at_a_time() -> None:
    x = da.from_array(np.arange(100 * 70).reshape(100, 70), chunks=30)
    tiles = list(_tiles(x, 32))
    assert len(tiles) == 4 * 3 and tiles[0].shape == (32, 32) and tiles[-1].shape == (4, 6)
    np.testing.assert_array_equal(tiles[4], x[32:64, 32:64].compute())


def test_export_refuses_unsafe_or_incomplete_outputs(store: Path, tmp_path: Path) -> None:
    code, msg = _run("export", str(store), str(tmp_path / "x.png"), "--format", "tiff")
    assert code == 2 and ".tif" in msg
    code, msg = _run("export", str(store), str(store / "in.tif"), "--format", "tiff")
    assert code == 2 and "outside the input" in msg
    (tmp_path / "old.tif").write_bytes(b"keep")
    code, msg = _run("export", str(store), str(tmp_path / "old.tif"), "--format", "tiff")
    assert code == 2 and "--overwrite" in msg
    assert (tmp_path / "old.tif").read_bytes() == b"keep"
    code, msg = _run("export", str(store), str(tmp_path / "o.zarr"), "--level", "1")
    assert code == 2 and "--format tiff" in msg
    sarr.set_complete(store, "labels/phases", False)
    code, msg = _run("export", str(store), str(tmp_path / "l.tif"), "--format", "tiff",
                     "--group", "labels/phases")
    assert code == 3 and "incomplete" in msg
    assert not (tmp_path / "l.tif").exists() and not list(tmp_path.glob("*.partial"))
    assert "Traceback" not in msg


# ------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    m = UNet(widths=(4, 8, 8), dropout=(0, 0, 0))
    cfg = ModelConfig(kwargs=m.kwargs(), classes=CLASSES,
                      colours=[(0, 0, 0, 255), (200, 0, 0, 255), (0, 200, 0, 255),
                               (0, 0, 200, 255)],
                      pixel_size_um=0.04458, window=64, receptive_field=receptive_field(m))
    return save_model(m, cfg, tmp_path_factory.mktemp("model") / "small.safetensors")


def test_onnx_matches_pytorch_on_any_multiple_of_the_stride(small_model: Path,
                                                           tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="ONNX export needs the optional onnx package "
                        "(pip install 'semdask[export]')")
    ort = pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime "
                              "(pip install 'semdask[export]')")
    from semdask.nets.export import export_onnx
    from semdask.nets.model import load_model

    out = tmp_path / "m.onnx"
    code, msg = _run("export-model", str(small_model), str(out), "--exporter", "torchscript")
    assert code == 0, msg
    assert "label agreement 100.0000 %" in msg and "opset 18" in msg
    net, _ = load_model(small_model)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).random((3, 1, 40, 24), dtype=np.float32)  # unseen size
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = sess.run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    with pytest.raises(Exception, match="overwrite"):
        export_onnx(small_model, out, exporter="torchscript")


@pytest.mark.slow
def test_onnx_dynamo_exporter(small_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime")
    from semdask.nets.export import export_onnx

    res = export_onnx(small_model, tmp_path / "d.onnx")
    assert res is not None and res.agreement == 1.0 and res.max_abs_diff < 1e-4


def test_bioimageio_package_validates_offline(small_model: Path, tmp_path: Path) -> None:
    bs = pytest.importorskip("bioimageio.spec", reason="bioimage.io export needs the optional "
                             "bioimageio.spec package (pip install 'semdask[export]')")
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime")
    from semdask.nets.bioimageio import _scale_range, export_bioimageio

    rng = np.random.default_rng(4)
    sample = rng.integers(0, 255, (100, 90)).astype(np.uint8)
    pkg = export_bioimageio(small_model, tmp_path / "pkg.zip", sample=sample,
                            exporter="torchscript")  # fast; dynamo: test_onnx_dynamo_exporter
    assert pkg.status in ("valid-format", "passed")
    with zipfile.ZipFile(pkg.path) as z:
        names = set(z.namelist())
        assert {"rdf.yaml", "weights.onnx", "test_input.npy", "test_output.npy", "cover.png",
                "README.md"} <= names
        assert not any(n.endswith((".pt", ".pth", ".pkl", ".ckpt")) for n in names)
    descr = bs.load_description(pkg.path, perform_io_checks=True)
    assert type(descr).__name__ == "ModelDescr" and str(descr.format_version).startswith("0.5")
    assert descr.inputs[0].axes[2].scale == pytest.approx(0.04458)
    # the consumer's recipe: scale_range, the ONNX weights, softmax = the test output
    with zipfile.ZipFile(pkg.path) as z:
        z.extractall(tmp_path / "x")
    raw = np.load(tmp_path / "x" / "test_input.npy")
    assert raw.shape == (1, 1, 100, 88)  # cropped to the network's 4-px grid
    sess = ort.InferenceSession(str(tmp_path / "x" / "weights.onnx"))
    logits = sess.run(None, {"input": _scale_range(raw, 0.5, 99.5)})[0]
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True),
                               np.load(tmp_path / "x" / "test_output.npy"), atol=1e-5)
