"""The public API mirrors the CLI: every name in ``semdask.__all__`` imports and runs.

One small synthetic mosaic goes through every arrow of the data flow with the top-level
functions only (``import semdask``), the way a user's notebook would.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

import semdask

ARROWS = ("convert", "label", "train", "segment", "analyze", "evaluate", "verify", "connect")


def test_all_public_names_resolve_to_documented_functions():
    assert set(ARROWS) | {"open_mosaic", "open_labels", "load_model", "phase_fractions"} \
        <= set(semdask.__all__)
    for name in semdask.__all__:
        if name == "__version__":
            continue
        obj = getattr(semdask, name)
        assert callable(obj), name
        assert inspect.isfunction(obj) or inspect.isfunction(getattr(obj, "__wrapped__", None)), \
            f"semdask.{name} is {obj!r}, not a function"
        doc = inspect.getdoc(obj) or ""
        assert doc, f"semdask.{name} has no docstring"
    assert "segment" in dir(semdask)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = semdask.nope  # type: ignore[attr-defined]


def test_arrow_functions_document_parameters_and_returns():
    for name in ARROWS:
        doc = inspect.getdoc(getattr(semdask, name)) or ""
        assert "Parameters\n----------" in doc, f"semdask.{name}: numpydoc Parameters missing"


def test_python_dash_m_semdask_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "semdask", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("segment", "convert", "train", "verify"):
        assert command in out


def test_the_package_is_typed():
    from importlib.resources import files

    assert files("semdask").joinpath("py.typed").is_file()


def test_every_arrow_runs_through_the_public_api(tmp_path, model_file):
    from PIL import Image

    from semdask.synthetic.sem import SynthParams, synthetic_mosaic

    # convert: an image file with its label image
    m = synthetic_mosaic((192, 192), seed=3, chunk=96, params=SynthParams())
    img, truth = np.asarray(m.image), np.asarray(m.truth)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(truth).save(tmp_path / "a-labels.png")
    store = tmp_path / "a.ome.zarr"
    mosaic = semdask.convert(tmp_path / "a.png", store, pixel_size_um=0.04458,
                             labels=tmp_path / "a-labels.png",
                             classes=["pore", "Ni", "NiO", "YSZ"])
    assert mosaic.image.shape == (192, 192)
    assert semdask.open_mosaic(store).image.shape == (192, 192)

    # segment -> verify -> open_labels -> phase_fractions / analyze / evaluate
    result = semdask.segment(store, model=model_file, progress=False, chunk=96)
    assert result is not None
    assert semdask.verify(store).ok
    labels = semdask.open_labels(store)
    fr = semdask.phase_fractions(labels.data, classes=labels.classes)
    assert np.isclose(sum(r.fraction for r in fr.rows), 1.0)
    (analysis,) = semdask.analyze(store)
    assert analysis is not None
    ev = semdask.evaluate(store, store, pred_labels="phases", truth_labels="truth")
    cm = ev.pooled.confusion
    assert cm.sum() == 192 * 192
    _, cfg = semdask.load_model(model_file)
    assert cfg.classes == ["pore", "Ni", "NiO", "YSZ"]

    # label: EDS-free random forest from a few scribbles on the truth
    rng = np.random.default_rng(0)
    ann = np.zeros_like(truth)
    for c in range(4):
        ys, xs = np.nonzero(truth == c)
        pick = rng.choice(len(ys), size=min(40, len(ys)), replace=False)
        ann[ys[pick], xs[pick]] = c + 1
    lab = semdask.label(store, ann, eds=None, n_estimators=10, chunk=96, unlabelled=0,
                        classes=["pore", "Ni", "NiO", "YSZ"])
    assert lab is not None

    # train: a few steps on the store's truth
    out = tmp_path / "m.safetensors"
    semdask.train([store], out, window=64, epochs=1, steps_per_epoch=2, batch_size=2,
                  widths=(4, 4, 8, 8, 8), val_window=64)
    assert out.exists()

    # connect: a local cluster (threads), closed on exit
    with semdask.connect(profile="local", n_workers=1, threads_per_worker=1,
                         dashboard_address="127.0.0.1:0") as client:
        assert client.submit(lambda x: x + 1, 1).result() == 2
