"""Training at one pixel size: resampled stores, the model's recorded scale, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.errors import InputError
from semdask.inference.rescale import resample_nearest, resample_numpy
from semdask.inference.segment import segment
from semdask.nets.model import load_model
from semdask.storage import arrays as sarr
from semdask.storage import io
from semdask.synthetic.sem import COLOURS, PHASES, synthetic_mosaic
from semdask.training.scale import factors_for, rescale_store, training_scale
from semdask.training.train import train

TINY = (4, 8, 16)


def _store(path: Path, shape: tuple[int, int], *, seed: int, px: float | None) -> Path:
    m = synthetic_mosaic(shape, seed=seed, chunk=64)
    io.write_image(path, m.image, pixel_size_um=px, chunk=64)
    io.write_labels(path, m.truth, name="truth", classes=PHASES, colours=COLOURS, chunk=64)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two mosaics of one field at different magnifications (0.05 and 0.1 um)."""
    root = tmp_path_factory.mktemp("scale")
    return [_store(root / "fine.ome.zarr", (320, 384), seed=1, px=0.05),
            _store(root / "coarse.ome.zarr", (192, 256), seed=2, px=0.1)]


def test_factors() -> None:
    assert factors_for([0.05, 0.1, 0.102], pixel_size_um=0.1) == [0.5, 1.0, 1.0]  # 2 % = same
    assert factors_for([None, 0.1], scale=0.5) == [0.5, 0.5]
    assert factors_for([None], pixel_size_um=0.1) == [None]
    with pytest.raises(InputError, match="exactly one of --pixel-size or --scale"):
        factors_for([0.1], pixel_size_um=0.1, scale=0.5)
    with pytest.raises(InputError, match="exactly one"):
        factors_for([0.1])
    with pytest.raises(InputError, match="finite number > 0"):
        factors_for([0.1], scale=-1.0)


def test_rescale_store_matches_numpy_resampling(stores: list[Path], tmp_path: Path) -> None:
    src = stores[0]
    out = rescale_store(src, tmp_path / "half.ome.zarr", 0.5, chunk=64)
    m, m0 = io.open_mosaic(out), io.open_mosaic(src)
    assert m.image.shape == (160, 192) and m.image.dtype == m0.image.dtype
    assert m.pixel_size_um == pytest.approx(0.1)
    img0 = np.asarray(m0.image.compute())
    want = np.clip(np.round(resample_numpy(img0.astype(np.float32), 0.5)), 0, 255)
    np.testing.assert_array_equal(np.asarray(m.image.compute()), want.astype(img0.dtype))
    lab0 = np.asarray(io.open_labels(src, "truth").data.compute())
    lab = io.open_labels(out, "truth")
    np.testing.assert_array_equal(np.asarray(lab.data.compute()), resample_nearest(lab0, 0.5))
    assert lab.classes == list(PHASES)
    assert sarr.read_attrs(out)["semdask"]["rescaled_from"]["factor"] == 0.5


def test_training_scale_brings_stores_to_one_pixel_size(stores: list[Path]) -> None:
    with training_scale(stores, pixel_size_um=0.1) as s:
        assert s.factors == [0.5, 1.0] and s.rescaled
        assert s.paths[1] == stores[1]  # already at 0.1 um: used as it is
        assert s.pixel_sizes_um == pytest.approx([0.1, 0.1])
        assert io.open_mosaic(s.paths[0]).image.shape == (160, 192)
        tmp = s.paths[0].parent
    assert not tmp.exists()  # copies removed afterwards
    with training_scale(stores) as s:
        assert s.paths == stores and not s.rescaled


def test_unknown_pixel_size_needs_scale(tmp_path: Path) -> None:
    p = _store(tmp_path / "nopx.ome.zarr", (128, 128), seed=3, px=None)
    with pytest.raises(InputError, match=r"semdask convert --pixel-size UM, or train with "
                       r"--scale F"), training_scale([p], pixel_size_um=0.1):
        pass
    with training_scale([p], scale=0.5) as s:
        assert io.open_mosaic(s.paths[0]).image.shape == (64, 64)
    q = _store(tmp_path / "px.ome.zarr", (128, 128), seed=4, px=0.1)
    with pytest.raises(InputError, match="all known or all unknown"), \
            training_scale([p, q], scale=0.5):
        pass


def test_scale_without_pixel_sizes_carries_to_segment(tmp_path: Path) -> None:
    """--scale on stores of unknown pixel size: segment resamples such mosaics by it."""
    p = _store(tmp_path / "a.ome.zarr", (256, 256), seed=5, px=None)
    r = train([p], tmp_path / "m.safetensors", window=32, epochs=1, steps_per_epoch=1,
              batch_size=2, widths=TINY, val_window=32, scale=0.5, augment="none",
              infer_window=64)
    cfg = load_model(r.model_path)[1]
    assert cfg.pixel_size_um is None and cfg.provenance["training_scale"]["scale"] == 0.5
    res = segment(p, model=r.model_path, name="pred", progress=False, device="cpu")
    assert res.rescale == 0.5
    assert io.open_labels(p, "pred").data.shape == (256, 256)
    res = segment(p, model=r.model_path, name="raw", progress=False, device="cpu",
                  rescale=False)
    assert res.rescale == 1.0


def test_train_at_a_pixel_size_records_it(stores: list[Path], tmp_path: Path) -> None:
    r = train(stores, tmp_path / "m.safetensors", window=32, epochs=1, steps_per_epoch=2,
              batch_size=2, widths=TINY, val_window=32, pixel_size_um=0.1, augment="none")
    _, cfg = load_model(r.model_path)
    assert cfg.pixel_size_um == pytest.approx(0.1)
    assert cfg.provenance["trained_on"] == ["fine.ome.zarr", "coarse.ome.zarr"]
    assert cfg.provenance["training_scale"]["factors"] == [0.5, 1.0]
    assert cfg.provenance["pixel_sizes_um"] == pytest.approx([0.1, 0.1])


def test_train_cli_scale(stores: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "c.safetensors"
    res = CliRunner().invoke(main, ["train", str(stores[1]), "--out", str(out), "--window",
                                    "32", "--epochs", "1", "--steps-per-epoch", "2",
                                    "--batch-size", "2", "--augment", "none", "--scale", "2"])
    assert res.exit_code == 0, res.output
    assert load_model(out)[1].pixel_size_um == pytest.approx(0.05)
    res = CliRunner().invoke(main, ["train", str(stores[1]), "--out", str(out), "--scale", "0"])
    assert res.exit_code != 0 and "--scale" in res.output
