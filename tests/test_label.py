"""EDS-guided random-forest labelling: features, registration, annotations, fit, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage as ndi

from semdask.analysis.metrics import confusion_matrix, scores_from_confusion
from semdask.cli.main import main
from semdask.errors import InputError
from semdask.labelling.annotations import (
    parse_annotations,
    rasterise,
    read_annotations,
    synthetic_scribbles,
)
from semdask.labelling.features import FeatureSpec, multiscale_features
from semdask.labelling.label import feature_stack, label
from semdask.labelling.registration import estimate_shift, load_eds, register_eds
from semdask.storage import arrays as sarr
from semdask.storage import io
from semdask.synthetic.sem import PHASES, render_region, synthetic_mosaic

N = 384
FAST = FeatureSpec(sigmas=(0.7, 1.6, 3.5, 5.0))


@pytest.fixture(autouse=True)
def _threads():
    with dask.config.set(scheduler="threads", num_workers=2):
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 384 x 384 synthetic mosaic with truth, EDS (true shift (3, -2) px) and scribbles."""
    p = tmp_path_factory.mktemp("label") / "m.ome.zarr"
    with dask.config.set(scheduler="threads", num_workers=2):
        io.write_synthetic(p, synthetic_mosaic((N, N), seed=3, chunk=N))
        truth = io.open_labels(p, "truth").data.compute()
        io.write_labels(p, synthetic_scribbles(truth, 40, seed=0), name="scribbles",
                        classes=["unlabelled", *PHASES])
    return p


def _scores(store: Path, name: str) -> dict:
    truth = io.open_labels(store, "truth").data
    return scores_from_confusion(confusion_matrix(io.open_labels(store, name).data, truth, 4)
                                 .compute())


# ----------------------------------------------------------------------------- features
@pytest.mark.parametrize("chunks", [(30, 40), (64, 50), (120, 150)])
def test_feature_stack_chunked_equals_in_memory(chunks):
    rng = np.random.default_rng(0)
    img = ndi.gaussian_filter(rng.normal(size=(2, 120, 150)), (0, 2, 2)).astype(np.float32)
    img += rng.normal(0, 0.1, img.shape).astype(np.float32)
    spec = FeatureSpec(sigmas=(0.7, 1.6, 3.5))
    assert spec.depth == math.ceil(4 * 3.5) == 14
    lazy = feature_stack(da.from_array(img, chunks=(1, *chunks)), spec)
    assert lazy.chunks[1:] == da.from_array(img, chunks=(1, *chunks)).chunks[1:]
    ref = multiscale_features(img, spec)
    assert lazy.shape == ref.shape == (2 * spec.n_per_channel, 120, 150)
    assert len(spec.names(["a", "b"])) == ref.shape[0]
    np.testing.assert_allclose(lazy.compute(), ref, rtol=1e-5, atol=1e-5)


def test_feature_depth_follows_largest_sigma():
    assert FeatureSpec().depth == 40
    assert FeatureSpec(sigmas=(0.7, 1.0)).depth == 4
    with pytest.raises(InputError, match="feature kinds"):
        FeatureSpec(kinds=("wavelet",))
    with pytest.raises(InputError, match="chunks"):
        feature_stack(da.zeros((100, 100), chunks=20), FeatureSpec(sigmas=(10.0,)))


# ----------------------------------------------------------------------------- registration
@pytest.mark.parametrize("shift", [(0.3, -0.6), (1.45, 0.8)])
def test_estimate_shift_recovers_subpixel_shift(shift):
    img, truth = render_region(0, 0, 1024, 1024, seed=2)
    table = np.array([[0.02, 1.0, 0.75, 0.02], [0.08, 0.02, 0.85, 0.6], [0.02, 0.01, 0.01, 0.95]])
    maps = ndi.shift(table[:, truth], (0, 4 * shift[0], 4 * shift[1]), order=1, mode="nearest")
    eds = ndi.gaussian_filter(maps.reshape(3, 256, 4, 256, 4).mean((2, 4)), (0, 2, 2))
    eds += np.random.default_rng(0).normal(0, 0.03, eds.shape)
    sem = img.astype(np.float32).reshape(256, 4, 256, 4).mean((1, 3))
    dy, dx, quality = estimate_shift(sem, eds, upsample_factor=20)
    assert abs(dy - shift[0]) < 0.25
    assert abs(dx - shift[1]) < 0.25
    assert quality > 0.5


def test_register_eds_on_synthetic_mosaic(store):
    m = io.open_mosaic(store)
    maps = load_eds("store", (N, N), mosaic=store)
    assert maps.factor == 4
    assert maps.channels == ("Ni", "O", "Zr")
    field = register_eds(m.image, maps, tile=192)
    assert field.raw.shape == (2, 2, 2)
    true = np.multiply(maps.true_shift_px, 4)  # (3, -2) SEM px
    np.testing.assert_allclose(field.mean, true, atol=1.0)


# ----------------------------------------------------------------------------- labelling
def test_rf_labels_beat_90_percent_and_eds_helps(store):
    r = label(store, "labels/scribbles", name="rf-eds", n_estimators=30, sem_features=FAST,
              chunk=N, overwrite=True)
    label(store, "labels/scribbles", eds=None, name="rf-sem", n_estimators=30,
          sem_features=FAST, chunk=N, overwrite=True)
    with_eds, sem_only = _scores(store, "rf-eds"), _scores(store, "rf-sem")
    assert with_eds["accuracy"] > 0.90
    assert with_eds["accuracy"] > sem_only["accuracy"] + 0.02
    assert r.shift is not None
    assert np.allclose(r.shift.mean, (3, -2), atol=1.0)
    assert min(r.n_train) > 100
    lab = io.open_labels(store, "rf-eds")
    assert lab.classes == list(PHASES)
    conf = io.open_extra_image(store, "rf-eds-confidence")
    assert conf.dtype == np.float16
    c = conf.compute().astype(np.float32)
    assert c.min() >= 0.25
    assert c.max() <= 1.0
    assert "training weight" in json.dumps(sarr.read_attrs(store, "rf-eds-confidence"))


def test_injected_classifiers_are_used(store):
    from sklearn.dummy import DummyClassifier

    tiny = FeatureSpec(sigmas=(1.0,), kinds=("gaussian",))
    dummy = DummyClassifier(strategy="prior")
    label(store, "labels/scribbles", eds=None, classifier=dummy, sem_features=tiny,
          name="dummy", chunk=N, overwrite=True)
    prior = dummy.class_prior_
    lab = io.open_labels(store, "dummy").data.compute()
    assert (lab == dummy.classes_[prior.argmax()]).all()
    conf = io.open_extra_image(store, "dummy-confidence").compute()
    np.testing.assert_allclose(conf.astype(float), prior.max(), atol=1e-3)

    class Threshold:  # fit/predict only: one-hot probabilities, confidence 1
        def fit(self, X, y):
            self.shape = X.shape
            return self

        def predict(self, X):
            return np.where(X[:, 0] < 60, 0, 3)

    clf = Threshold()
    r = label(store, "labels/scribbles", eds=None, classifier=clf, sem_features=tiny,
              name="thr", chunk=N, overwrite=True)
    assert r.classifier is clf
    assert clf.shape[1] == tiny.n_per_channel == 2
    assert set(np.unique(io.open_labels(store, "thr").data.compute())) <= {0, 3}


# ----------------------------------------------------------------------------- annotations
def test_annotations_from_csv_and_geojson(tmp_path):
    csv_p = tmp_path / "pts.csv"
    csv_p.write_text("y,x,class,radius\n10,12,pore,\n30,40,ni,3\n50,5,2,\n")
    gj = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [50, 20]},
         "properties": {"classification": {"name": "YSZ"}}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[5, 60],
                                                                                [25, 60]]},
         "properties": {"class": "NiO", "radius": 1}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[40, 40], [60, 40],
                                                                              [60, 60], [40, 60],
                                                                              [40, 40]]]},
         "properties": {"class": "pore"}}]}
    gj_p = tmp_path / "shapes.geojson"
    gj_p.write_text(json.dumps(gj))
    pts = parse_annotations(csv_p, PHASES)
    assert [a.cls for a in pts] == [0, 1, 2]
    assert pts[1].radius == 3
    r = rasterise(pts + parse_annotations(gj_p, PHASES), 0, 0, 64, 64)
    assert (r[10, 12], r[30, 40], r[50, 5], r[20, 50], r[60, 15], r[50, 50]) == (1, 2, 3, 4,
                                                                                 3, 1)
    assert r[0, 0] == 0
    lazy = read_annotations(csv_p, (64, 64), ((30, 34), (64,)), classes=PHASES)
    np.testing.assert_array_equal(lazy.compute(), rasterise(pts, 0, 0, 64, 64))


def test_bad_inputs_raise_input_errors_with_a_fix(store, tmp_path):
    with pytest.raises(InputError, match="at least one labelled pixel") as e:
        label(store, np.zeros((N, N), np.uint8), eds=None, sem_features=FAST, chunk=N,
              name="x", overwrite=True)
    assert e.value.fix
    bad = tmp_path / "bad.csv"
    bad.write_text("y,x,class\n1,2,Cu\n")
    with pytest.raises(InputError, match="Cu") as e:
        parse_annotations(bad, PHASES)
    assert "--classes" in (e.value.fix or "")
    with pytest.raises(InputError, match=r"\(c, y, x\)") as e:
        load_eds(np.zeros((96, 96), np.float32), (N, N))
    assert "np.stack" in (e.value.fix or "")
    with pytest.raises(InputError, match="integer fraction"):
        load_eds(np.zeros((3, 100, 90), np.float32), (N, N))
    too_big = np.zeros((N, N), np.uint8)
    too_big[5:9, 5:9] = 9
    with pytest.raises(InputError, match=r"values 1\.\.4"):
        label(store, too_big, eds=None, sem_features=FAST, chunk=N, name="x", overwrite=True)


# ----------------------------------------------------------------------------- CLI, example
def test_cli_label(store, tmp_path):
    import tifffile

    runner = CliRunner()
    r = runner.invoke(main, ["label", str(store), "-a", "labels/scribbles", "--no-cluster",
                             "--trees", "10", "--chunks", str(N), "--name", "cli-rf",
                             "--overwrite"])
    assert r.exit_code == 0, r.output
    assert "EDS shift (dy, dx)" in r.output
    assert "(true: +3.00, -2.00)" in r.output
    assert io.open_labels(store, "cli-rf").classes == list(PHASES)

    eds = io.open_extra_image(store, "eds").compute()
    files = []
    for name, plane in zip(("Ni", "O", "Zr"), eds, strict=True):
        tifffile.imwrite(tmp_path / f"{name}.tif", plane)
        files += ["--eds", f"{name}={tmp_path / f'{name}.tif'}"]
    (tmp_path / "pts.csv").write_text("y,x,class,radius\n" + "\n".join(
        f"{y},{x},{c},4" for y, x, c in [(20, 20, "pore"), (200, 300, "YSZ"), (100, 100, "Ni"),
                                         (300, 50, "NiO")]))
    out = tmp_path / "out.ome.zarr"
    r = runner.invoke(main, ["label", str(store), "-a", str(tmp_path / "pts.csv"), *files,
                             "--no-cluster", "--trees", "5", "--chunks", str(N), "-o",
                             str(out), "--no-register"])
    assert r.exit_code == 0, r.output
    assert io.open_labels(out, "eds-rf").data.shape == (N, N)

    r = runner.invoke(main, ["label", str(store), "-a", "labels/scribbles", "--eds", "Ni",
                             "--no-cluster"])
    assert r.exit_code != 0
    assert "ELEMENT=FILE" in r.output


def test_example_runs(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "eds_labelling.py"
    r = subprocess.run([sys.executable, str(example), "--out", str(tmp_path), "--shape", "512",
                        "512", "--counts", "5", "20", "--trees", "20"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "EDS gain in accuracy" in r.stdout
    rows = (tmp_path / "eds_labelling.csv").read_text().splitlines()
    assert len(rows) == 5
    assert (tmp_path / "eds_labelling.png").stat().st_size > 1000
