"""Stores as xarray DataArrays (semdask.storage.xarrays) and results as pandas tables."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import semdask
from semdask.analysis.evaluate import evaluate
from semdask.analysis.metrics import phase_fractions
from semdask.analysis.quantify import analyze_labels
from semdask.errors import IncompleteOutputError, InputError
from semdask.storage import arrays as sarr
from semdask.storage import io
from semdask.storage.xarrays import open_dataarray, to_dataarray

CLASSES = ["pore", "Ni", "NiO", "YSZ"]
PX = 0.05


@pytest.fixture
def store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (200, 300), dtype=np.uint8)
    m = io.write_image(tmp_path / "m.ome.zarr", da.from_array(img, chunks=64),
                       pixel_size_um=PX, levels=3, chunk=64)
    io.write_labels(m.path, da.from_array((img // 64).astype(np.uint8), chunks=64),
                    classes=CLASSES, chunk=64)
    probs = rng.random((4, 200, 300)).astype(np.float32)
    io.write_extra_image(m.path, "probs", da.from_array(probs, chunks=(4, 64, 64)),
                         channel_names=CLASSES, chunk=64)
    return m.path


def test_image_is_lazy_chunk_aligned_and_calibrated(store: Path) -> None:
    x = semdask.open_dataarray(store)
    m = io.open_mosaic(store)
    assert x.dims == ("y", "x") and x.shape == (200, 300)
    assert isinstance(x.data, da.Array) and x.chunks == m.image.chunks  # no rechunk, no copy
    assert x.x.attrs["units"] == "um" and x.attrs["pixel_size_um"] == PX
    np.testing.assert_allclose(x.x.values[:3], [0.025, 0.075, 0.125])  # pixel centres
    np.testing.assert_array_equal(x.values, m.image.compute())


def test_sel_by_micrometres_equals_the_numpy_slice(store: Path) -> None:
    x = open_dataarray(store, "image")
    ref = io.open_mosaic(store).image.compute()
    # 2.0-4.5 µm in y = pixels 40..89; 1.0-3.0 µm in x = pixels 20..59 (centres inside)
    got = x.sel(y=slice(2.0, 4.5), x=slice(1.0, 3.0))
    assert got.shape == (50, 40)
    np.testing.assert_array_equal(got.values, ref[40:90, 20:60])
    # nearest-pixel lookup of one point in µm
    assert int(x.sel(y=7.33, x=12.01, method="nearest")) == int(ref[146, 240])


def test_levels_line_up_in_micrometres(store: Path) -> None:
    x0, x1 = open_dataarray(store, level=0), open_dataarray(store, level=1)
    assert x1.shape == (100, 150) and x1.attrs["pixel_size_um"] == 2 * PX
    # the level-1 pixel centre lies between the two level-0 pixels it averages
    np.testing.assert_allclose(x1.x.values, (x0.x.values[0::2] + x0.x.values[1::2]) / 2)
    with pytest.raises(InputError, match="level"):
        open_dataarray(store, level=7)


def test_labels_and_probs(store: Path) -> None:
    lab = open_dataarray(store, "labels/phases")
    assert lab.dtype == np.uint8 and lab.dims == ("y", "x")
    assert lab.attrs["classes"] == CLASSES and lab.attrs["flag_meanings"] == "pore Ni NiO YSZ"
    np.testing.assert_array_equal(lab.attrs["flag_values"], [0, 1, 2, 3])
    same = to_dataarray(io.open_labels(store), level=1)
    xr.testing.assert_identical(same, open_dataarray(store, "labels/phases", level=1))
    p = open_dataarray(store, "probs")
    assert p.dims == ("c", "y", "x") and list(p.c.values) == CLASSES
    ref = io.open_extra_image(store, "probs").compute()
    np.testing.assert_array_equal(p.sel(c="NiO", y=slice(0, 1)).values, ref[2, :20])


def test_unknown_pixel_size_is_in_pixels(tmp_path: Path) -> None:
    m = io.write_image(tmp_path / "u.ome.zarr", np.zeros((32, 48), np.uint8),
                       pixel_size_um=None, levels=1)
    x = open_dataarray(m.path)
    assert x.x.attrs["units"] == "pixel" and "pixel size unknown" in x.x.attrs["note"]
    np.testing.assert_allclose(x.x.values[:2], [0.5, 1.5])


def test_incomplete_group_is_refused(store: Path) -> None:
    sarr.set_complete(store, "labels/phases", False)
    with pytest.raises(IncompleteOutputError):
        open_dataarray(store, "labels/phases")


def test_results_as_tables() -> None:
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 4, (96, 128)).astype(np.uint8)
    pred = truth.copy()
    pred[:10] = 0
    f = phase_fractions(pred, classes=CLASSES, pixel_size_um=PX)
    df = f.to_dataframe()
    assert list(df.index) == CLASSES
    assert df["pixels"].sum() == pred.size
    assert df.loc["pore", "pixels"] == int((pred == 0).sum())
    np.testing.assert_allclose(df["area_um2"], df["pixels"] * PX**2)

    a = analyze_labels(pred, classes=CLASSES, pixel_size_um=PX, tile=32)
    tabs = a.to_dataframes()
    assert {"fractions", "interfaces", "tpb"} <= set(tabs)
    fr = tabs["fractions"].set_index("phase")
    assert fr.loc["Ni", "pixels"] == int((pred == 1).sum())
    assert tabs["fractions"].attrs["unit"] == "um"

    e = evaluate(pred, truth, classes=CLASSES, overlay=False)
    by_class = e.to_dataframe()
    iou = by_class.loc["Ni", "iou"]
    tp = ((pred == 1) & (truth == 1)).sum()
    assert iou == pytest.approx(tp / ((pred == 1) | (truth == 1)).sum())
    assert isinstance(e.to_dataframe(by="image"), pd.DataFrame)
    cm = e.pooled.confusion_dataarray()
    assert cm.dims == ("truth", "pred")
    assert int(cm.sel(truth="Ni", pred="pore")) == int(((truth == 1) & (pred == 0)).sum())
    with pytest.raises(InputError, match="by"):
        e.to_dataframe(by="tile")
