"""Pixel-size awareness: chunk-invariant resampling and ``segment(rescale=...)``."""

from __future__ import annotations

import logging
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from semdask.errors import InputError
from semdask.inference.rescale import (
    resample,
    resample_nearest,
    resample_numpy,
    scale_factor,
    target_shape,
)
from semdask.inference.segment import segment
from semdask.nets.model import ModelConfig, receptive_field, save_model
from semdask.nets.unet import UNet
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.synthetic.sem import COLOURS, PHASES, synthetic_mosaic

MODEL_UM = 0.04458


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    m = UNet(widths=(4, 4, 8, 8, 8), dropout=(0, 0, 0, 0, 0))
    cfg = ModelConfig(kwargs=m.kwargs(), classes=list(PHASES), colours=list(COLOURS),
                      pixel_size_um=MODEL_UM, window=64, receptive_field=receptive_field(m))
    return save_model(m, cfg, tmp_path_factory.mktemp("model") / "tiny.safetensors")


def _store(path: Path, pixel_size_um: float | None, shape: tuple[int, int] = (200, 264)) -> Path:
    """A synthetic mosaic rendered at the model's scale, resampled to ``pixel_size_um``."""
    img = synthetic_mosaic((400, 528), seed=7, chunk=256).image.compute()
    if pixel_size_um is not None:
        img = resample_numpy(img, MODEL_UM / pixel_size_um, shape=shape)
    else:
        img = img[: shape[0], : shape[1]].astype(np.float32)
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    sio.write_image(path, da.from_array(img, chunks=128), pixel_size_um=pixel_size_um)
    return path


@pytest.mark.parametrize("factor", [2.0, 0.5, 1.37, 0.71])
def test_resample_is_chunk_invariant(factor: float) -> None:
    x = np.random.default_rng(0).random((3, 83, 117)).astype(np.float32)
    ref = resample_numpy(x, factor)
    assert ref.shape == (3, *target_shape(x.shape, factor))
    for cin, cout in [((3, 20, 31), 16), ((3, 83, 117), 1000), ((3, 50, 7), 45)]:
        lazy = resample(da.from_array(x, chunks=cin), factor, chunk=cout)
        assert lazy.chunks[-1][0] == min(cout, ref.shape[-1])
        np.testing.assert_array_equal(lazy.compute(), ref)  # bitwise, any chunking


def test_resample_round_trip_and_antialiasing() -> None:
    yy, xx = np.mgrid[0:96, 0:128].astype(np.float32)
    smooth = np.sin(yy / 9) * np.cos(xx / 13)
    back = resample_numpy(resample_numpy(smooth, 2.0), 0.5, shape=smooth.shape)
    assert np.abs(back - smooth)[4:-4, 4:-4].max() < 0.02
    checker = ((yy + xx) % 2).astype(np.float32)  # Nyquist: antialiasing averages it out
    assert np.ptp(resample_numpy(checker, 0.5)[2:-2, 2:-2]) < 0.3
    lab = (xx > 60).astype(np.uint8)
    near = resample_nearest(lab, 0.5)
    assert near.dtype == np.uint8 and set(np.unique(near)) == {0, 1}
    assert ndi.label(near)[1] == 1


def test_scale_factor_modes(caplog: pytest.LogCaptureFixture) -> None:
    assert scale_factor(0.08916, MODEL_UM) == pytest.approx(2.0)
    assert scale_factor(0.046, MODEL_UM) == 1.0  # within 5 %: auto leaves it
    assert scale_factor(0.046, MODEL_UM, rescale=True) == pytest.approx(0.046 / MODEL_UM)
    assert scale_factor(0.08916, MODEL_UM, rescale=False) == 1.0
    with caplog.at_level(logging.WARNING):
        assert scale_factor(None, MODEL_UM) == 1.0
    assert "unknown" in caplog.text
    with pytest.raises(InputError, match="unknown"):
        scale_factor(0.1, None, rescale=True)


def test_segment_at_twice_the_model_pixel_size(tmp_path: Path, model_file: Path) -> None:
    p = _store(tmp_path / "coarse.ome.zarr", 2 * MODEL_UM)
    r = segment(p, model=model_file, chunk=64, name="a", progress=False, probs=True)
    assert r.rescale == pytest.approx(2.0)
    lab = sio.open_labels(p, "a")
    assert lab.data.shape == (200, 264)
    probs = np.asarray(sio.open_extra_image(p, "probs").compute(), np.float32)
    assert probs.shape == (4, 200, 264)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=4e-3)
    prov = sarr.read_attrs(p, "labels/a")["semdask"]["provenance"]
    assert prov["rescale"]["factor"] == pytest.approx(2.0)
    assert prov["rescale"]["model_scale_shape"] == [400, 528]
    # chunk-invariant end to end (resample -> blended windows -> resample back)
    segment(p, model=model_file, chunk=300, name="b", progress=False)
    np.testing.assert_array_equal(lab.data.compute(), sio.open_labels(p, "b").data.compute())
    # disabled: inference on the mosaic's own grid, a different answer, factor 1 recorded
    r = segment(p, model=model_file, chunk=64, name="c", progress=False, rescale=False,
                probs=True, overwrite=True)
    assert r.rescale == 1.0
    assert sarr.read_attrs(p, "labels/c")["semdask"]["provenance"]["rescale"]["factor"] == 1.0
    other = np.asarray(sio.open_extra_image(p, "probs").compute(), np.float32)
    assert not np.array_equal(other, probs)


def test_segment_at_half_the_model_pixel_size(tmp_path: Path, model_file: Path) -> None:
    p = _store(tmp_path / "fine.ome.zarr", MODEL_UM / 2, shape=(256, 300))
    r = segment(p, model=model_file, chunk=128, progress=False)
    assert r.rescale == pytest.approx(0.5) and r.plan.shape == (256, 300)
    assert sio.open_labels(p).data.shape == (256, 300)


def test_segment_unknown_pixel_size_warns_and_does_not_rescale(
        tmp_path: Path, model_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _store(tmp_path / "unknown.ome.zarr", None, shape=(128, 160))
    with caplog.at_level(logging.WARNING):
        r = segment(p, model=model_file, chunk=64, progress=False)
    assert r.rescale == 1.0 and "pixel size is unknown" in caplog.text
    with pytest.raises(InputError, match="unknown"):
        segment(p, model=model_file, chunk=64, progress=False, rescale=True, name="x")


def test_resume_run_key_includes_the_rescale(tmp_path: Path, model_file: Path) -> None:
    p = _store(tmp_path / "coarse.ome.zarr", 2 * MODEL_UM, shape=(128, 160))
    first = segment(p, model=model_file, chunk=64, progress=False, resume=True)
    again = segment(p, model=model_file, chunk=64, progress=False, resume=True)
    assert again.up_to_date and again.rescale == first.rescale == pytest.approx(2.0)
    off = segment(p, model=model_file, chunk=64, progress=False, resume=True, rescale=False)
    assert not off.up_to_date and off.blocks_computed == off.blocks_total > 0


def test_cli_segment_rescale_flag(tmp_path: Path, model_file: Path) -> None:
    from click.testing import CliRunner

    from semdask.cli.main import main

    p = _store(tmp_path / "coarse.ome.zarr", 2 * MODEL_UM, shape=(128, 160))
    base = ["segment", str(p), "--model", str(model_file), "--chunks", "64", "--no-cluster"]
    r = CliRunner().invoke(main, [*base, "--name", "auto"])
    assert r.exit_code == 0, r.output
    assert "resampled by 2" in r.output
    r = CliRunner().invoke(main, [*base, "--name", "off", "--no-rescale"])
    assert r.exit_code == 0, r.output
    factors = [sarr.read_attrs(p, f"labels/{n}")["semdask"]["provenance"]["rescale"]["factor"]
               for n in ("auto", "off")]
    assert factors == [pytest.approx(2.0), 1.0]
